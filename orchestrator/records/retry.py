"""Riding out tracking-server outages: retry with backoff, a deadline, and no secrets in messages.

Every MLflow call transferlab makes goes through :class:`RetryingClient` (``Tracker.client`` is
one). A call that fails because the server cannot be reached (connection refused or reset,
timeouts, HTTP 5xx, a locked sqlite file) is retried with exponential backoff. The *outage*, not
the call, has the deadline: once calls in this process have failed without a single success for
``TRANSFERLAB_TRACKING_DEADLINE_S`` seconds (default 600), every call raises
:class:`TrackingUnavailable` at once, and the study stops with a resumable state: finished runs
are FINISHED in MLflow, checkpoints are in storage, and running ``transferlab run`` again picks
up from there.

MLflow's own HTTP client retries for minutes by default; :data:`MLFLOW_HTTP_ENV` (put into the
driver's and every Ray worker's environment by ``orchestrator.execution.ray_connection``) bounds that, so that
this module's deadline is the one that counts.

Retried writes are idempotent: metrics keep the timestamp they were first sent with (MLflow
stores an identical metric once), params and tags are set to the same value again, and a run
creation that may have reached the server before the connection dropped is looked up by its
``transferlab.config_hash`` tag before it is sent again.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable

from orchestrator.records.schema import TAG_CONFIG_HASH, TAG_KIND

DEADLINE_ENV = "TRANSFERLAB_TRACKING_DEADLINE_S"
DEFAULT_DEADLINE_S = 600.0
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


class _Outage:
    """When calls in this process started failing with no success since (None: no outage)."""

    down_since: float | None = None


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
            now = time.monotonic()
            if _Outage.down_since is None:
                _Outage.down_since = now
                print(
                    f"warning: tracking server {redact(uri)} unreachable ({what}); retrying for up to "
                    f"{deadline_s():.0f}s",
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
                f"tracking server {redact(uri)} reachable again after {time.monotonic() - _Outage.down_since:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            _Outage.down_since = None
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
