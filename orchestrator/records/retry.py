"""Riding out tracking-server outages: retry with backoff, a deadline, and no secrets in messages.

Every MLflow call transferlab makes goes through :class:`RetryingClient` (``Tracker.client`` is
one). A call that fails because the server cannot be reached (connection refused or reset,
timeouts, HTTP 5xx, a locked sqlite file) is retried with exponential backoff. The *outage*, not
the call, has the deadline, and the outage is the study's, not a process's: its start is kept
in the study's storage (``STORAGE/_tracking_outage/STORE.json``, named by
``TRANSFERLAB_OUTAGE_CLOCK``, which the driver sets and ships to every Ray process), so a trial
started mid-outage counts from when the outage began, not from its own first failure. Once the
outage is ``TRANSFERLAB_TRACKING_DEADLINE_S`` seconds old (default 600), every call in every
process raises :class:`TrackingUnavailable` at once, no new trial or search starts work
(:func:`check_outage`), and the study stops with a resumable state: finished runs are FINISHED
in MLflow, checkpoints are in storage, and running ``transferlab run`` again picks up from
there. The first successful call clears the clock.

MLflow's own HTTP client retries for minutes by default; :data:`MLFLOW_HTTP_ENV` (put into the
driver's and every Ray worker's environment by ``orchestrator.execution.ray_connection``) bounds that, so that
this module's deadline is the one that counts.

Retried writes are idempotent: metrics keep the timestamp they were first sent with (MLflow
stores an identical metric once), params and tags are set to the same value again, and a run
creation that may have reached the server before the connection dropped is looked up by its
``transferlab.config_hash`` tag before it is sent again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable

from orchestrator.records.credentials import split_credentials
from orchestrator.records.schema import TAG_CONFIG_HASH, TAG_KIND

DEADLINE_ENV = "TRANSFERLAB_TRACKING_DEADLINE_S"
DEFAULT_DEADLINE_S = 600.0
OUTAGE_CLOCK_ENV = "TRANSFERLAB_OUTAGE_CLOCK"  # the shared outage start (a file or object URI)
OUTAGE_DIR = "_tracking_outage"
# One retry inside MLflow's HTTP client, and no request hanging longer than this: the backoff
# and the deadline below are ours. MLflow's "View run at URL" lines are off: they print the
# tracking URI as given, credentials included (transferlab prints its own, redacted).
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

_TRANSIENT = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "max retries exceeded",
    "failed to establish a new connection",
    "remote end closed connection",
    "read timed out",
    "timed out",
    "temporarily unavailable",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
    "error code 500",
    "error code 502",
    "error code 503",
    "error code 504",
    "too many 50",
    "database is locked",
    "broken pipe",
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable past the deadline."""


def redact(text: str) -> str:
    """``text`` with the user-info of every URI in it (``http://user:TOKEN@host``) masked."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))


def deadline_s() -> float:
    try:
        return max(0.0, float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S)))
    except ValueError:
        return DEFAULT_DEADLINE_S


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not see: the server is down or overloaded."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT)


def store_key(tracking_uri: str) -> str:
    """A short name of a tracking store, the same for every process: a digest of its URI
    without credentials."""
    bare = split_credentials(tracking_uri)[0].rstrip("/")
    return hashlib.sha256(bare.encode()).hexdigest()[:16]


def outage_clock(storage: str, tracking_uri: str) -> str:
    """Where the studies on ``storage`` that write to ``tracking_uri`` keep their outage's start."""
    return f"{storage.rstrip('/')}/{OUTAGE_DIR}/{store_key(tracking_uri)}.json"


class _Outage:
    """When calls started failing with no success since (``time.time()``; None: no outage):
    the earliest this process saw or read from the shared clock."""

    down_since: float | None = None


def _shared_start(now: float) -> float:
    """The outage's start on the shared clock, written as ``now`` if it has none; ``now`` when
    there is no clock or it cannot be read (the deadline is then this process's own)."""
    from datasets_.objstore import filesystem, write_atomic

    clock = os.environ.get(OUTAGE_CLOCK_ENV)
    if not clock:
        return now
    try:
        fs, path = filesystem(clock)
        try:
            with fs.open_input_stream(path) as f:
                return min(now, float(json.loads(f.read())["down_since"]))
        except (FileNotFoundError, ValueError, KeyError):
            write_atomic(clock, lambda f: f.write(json.dumps({"down_since": now}).encode()))
    except Exception:
        pass
    return now


def reset_outage_clock() -> None:
    """The tracking store answered: no outage, here or on the shared clock."""
    from datasets_.objstore import filesystem

    _Outage.down_since = None
    clock = os.environ.get(OUTAGE_CLOCK_ENV)
    if clock:
        try:
            fs, path = filesystem(clock)
            fs.delete_file(path)
        except Exception:
            pass  # already gone, or unreachable: a later success clears it


def check_outage(uri: str = "") -> None:
    """:class:`TrackingUnavailable` if the study's outage (this process's or the shared clock's)
    is past the deadline: called before a trial or a search starts work."""
    now = time.time()
    start = _Outage.down_since
    if os.environ.get(OUTAGE_CLOCK_ENV):
        from datasets_.objstore import filesystem

        try:
            fs, path = filesystem(os.environ[OUTAGE_CLOCK_ENV])
            with fs.open_input_stream(path) as f:
                shared = float(json.loads(f.read())["down_since"])
            start = shared if start is None else min(start, shared)
        except Exception:
            pass  # no clock: no outage elsewhere
    if start is not None and now - start >= deadline_s():
        server = f"tracking server {redact(uri)}" if uri else "tracking server"
        raise TrackingUnavailable(
            f"{server} unreachable for {now - start:.0f}s (deadline {DEADLINE_ENV}={deadline_s():g})"
        )


def call(fn: Callable, *args, what: str = "MLflow call", uri: str = "", **kwargs):
    """``fn(*args, **kwargs)``, retried with backoff while the failure is transient and the
    outage is younger than the deadline; then :class:`TrackingUnavailable`."""
    delay = 0.5
    while True:
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            now = time.time()
            if _Outage.down_since is None:
                _Outage.down_since = _shared_start(now)
                print(
                    f"warning: tracking server {redact(uri)} unreachable ({what}); retrying for up to "
                    f"{max(0.0, deadline_s() - (now - _Outage.down_since)):.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            waited = now - _Outage.down_since
            if waited >= deadline_s():
                first = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                raise TrackingUnavailable(
                    f"tracking server {redact(uri)} unreachable for {waited:.0f}s "
                    f"(deadline {DEADLINE_ENV}={deadline_s():g}): {first[:200]}"
                ) from None
            time.sleep(min(delay, max(0.05, deadline_s() - waited)))
            delay = min(delay * 2, max(0.5, min(10.0, deadline_s() / 10)))
            continue
        if _Outage.down_since is not None:
            print(
                f"tracking server {redact(uri)} reachable again after {time.time() - _Outage.down_since:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            reset_outage_clock()
        return out


class RetryingClient:
    """An :class:`mlflow.tracking.MlflowClient` whose every method goes through :func:`call`."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def retried(*args, **kwargs):
            return call(attr, *args, what=name, uri=self._uri, **kwargs)

        return retried

    def create_run(self, experiment_id, *args, tags=None, **kwargs):
        """Create a run; after a dropped connection, first look for the run the lost request
        may already have created (same ``transferlab.config_hash`` and kind)."""
        attempts = 0

        def once():
            nonlocal attempts
            attempts += 1
            if attempts > 1 and tags and TAG_CONFIG_HASH in tags:
                flt = (
                    f"tags.`{TAG_CONFIG_HASH}` = '{tags[TAG_CONFIG_HASH]}' "
                    f"and tags.`{TAG_KIND}` = '{tags.get(TAG_KIND, '')}'"
                )
                found = self._client.search_runs([experiment_id], filter_string=flt, max_results=1)
                if found:
                    return found[0]
            return self._client.create_run(experiment_id, *args, tags=tags, **kwargs)

        return call(once, what="create_run", uri=self._uri)

    def log_inputs(self, run_id, *args, **kwargs):
        """Log dataset inputs. Trials of one study log the same dataset at once, and the store
        keeps one row per (experiment, name, digest): the loser of that race gets a
        unique-constraint error, and its next attempt finds the row the winner wrote."""
        for attempt in range(5):
            try:
                return call(self._client.log_inputs, run_id, *args, what="log_inputs", uri=self._uri, **kwargs)
            except Exception as e:
                if attempt == 4 or not _is_duplicate(e):
                    raise
                time.sleep(0.05 * (attempt + 1))


def _is_duplicate(e: Exception) -> bool:
    """A store's unique-constraint error (SQLite, PostgreSQL, MySQL wording)."""
    text = str(e).lower()
    return "unique constraint" in text or "duplicate" in text or "integrityerror" in text
