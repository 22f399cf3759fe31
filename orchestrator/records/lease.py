"""One driver per study: a lease on the study's MLflow experiment, kept alive by a heartbeat.

Two drivers on one study would reopen each other's RUNNING runs, train the same checkpoints
twice and mark each other's live runs KILLED. So ``transferlab run`` takes the study's lease
before it touches a run: the experiment tag :data:`~orchestrator.records.schema.TAG_DRIVER_LEASE`
holds the driver (a random id, host, pid, since when) and its last heartbeat (``time.time()``),
rewritten every ``TRANSFERLAB_LEASE_HEARTBEAT_S`` seconds (default 10) by a thread. It lives in
MLflow, not in storage, because two drivers of one study may use different storage paths (a
local run beside a submitted one) but always share its tracking store.

A second driver, finding the lease held,

- refuses at once (:class:`StudyBusy`, one line naming the holder) while the heartbeat is fresh
  (at most 1.5 heartbeat intervals old);
- waits, saying so, while it is stale but younger than ``TRANSFERLAB_LEASE_EXPIRY_S`` (default
  30): a busy holder's heartbeat comes back (then it refuses), a dead one's does not;
- takes the lease over once the heartbeat is that old (a driver killed without cleanup), or at
  once when the holder ran on this machine (same host and pid namespace) and its process is gone.

MLflow offers no compare-and-set, so taking is write, wait a moment, read back: of two drivers
taking at once, the later write wins and the other sees it and refuses. The window left is a
second driver whose read and write straddle the first's whole write-and-read-back (a
quarter of a heartbeat interval, at most a second). A holder whose heartbeat finds another
driver in the tag has lost the lease (:attr:`StudyLease.lost`: it stalled past the expiry) and
must leave the study's runs alone. Heartbeat ages compare wall clocks of two machines: they are
assumed to agree within a few seconds (NTP).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from orchestrator.records.schema import TAG_DRIVER_LEASE
from orchestrator.records.tracker import Tracker

HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "TRANSFERLAB_LEASE_HEARTBEAT_S", 10.0
EXPIRY_ENV, DEFAULT_EXPIRY_S = "TRANSFERLAB_LEASE_EXPIRY_S", 30.0


class StudyBusy(RuntimeError):
    """Another live driver holds the study's lease."""


def _seconds(env: str, default: float) -> float:
    try:
        return max(0.05, float(os.environ.get(env, default)))
    except ValueError:
        return default


def heartbeat_s() -> float:
    return _seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def expiry_s() -> float:
    return max(_seconds(EXPIRY_ENV, DEFAULT_EXPIRY_S), 2 * heartbeat_s())


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (tells a reused pid apart); "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True)
class Holder:
    """Who holds a study's lease, as stored in the experiment tag."""

    driver: str
    host: str
    pid: int
    since: float
    heartbeat: float
    pid_namespace: str = ""
    process_start: str = ""

    @classmethod
    def me(cls, driver: str, since: float) -> Holder:
        pid = os.getpid()
        return cls(driver, socket.gethostname(), pid, since, time.time(), _pid_namespace(), _process_start(pid))

    @classmethod
    def parse(cls, text: str | None) -> Holder | None:
        try:
            d = json.loads(text or "")
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (ValueError, TypeError, KeyError):
            return None  # no lease, a released one ("") or garbage: free to take

    def dump(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def gone(self) -> bool:
        """True when the holder ran on this machine and its process no longer exists."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace() or not self.pid_namespace:
            return False
        try:
            with open(f"/proc/{self.pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line.split()[1] for line in f):
                    return True  # a zombie: killed, not yet reaped
        except OSError:
            return True
        return bool(self.process_start) and _process_start(self.pid) != self.process_start


class StudyLease:
    """The lease of one study (its experiment), taken by :meth:`acquire`, kept by a heartbeat
    thread and given back by :meth:`release`; a context manager doing both."""

    def __init__(self, tracker: Tracker, experiment_id: str, study: str, say=None):
        self.client, self.uri = tracker.client, tracker.uri
        self.experiment_id, self.study = experiment_id, study
        self.driver = uuid.uuid4().hex
        self.lost = False  # another driver took the lease while this one held it
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = 0.0

    def holder(self) -> Holder | None:
        exp = self.client.get_experiment(self.experiment_id)
        return Holder.parse(exp.tags.get(TAG_DRIVER_LEASE))

    def _write(self, client) -> None:
        client.set_experiment_tag(self.experiment_id, TAG_DRIVER_LEASE, Holder.me(self.driver, self._since).dump())

    def acquire(self) -> None:
        """Take the lease, waiting for a stale one to expire; :class:`StudyBusy` if a live driver holds it."""
        beat, expiry = heartbeat_s(), expiry_s()
        waiting_on = None  # (driver, heartbeat) of a silent holder this driver waits out
        while True:
            held = self.holder()
            age = time.time() - held.heartbeat if held else 0.0
            if held is None or held.driver == self.driver:
                pass
            elif held.gone():
                self._say(f"note: taking over the lease of study '{self.study}' from a driver that is gone "
                          f"({held.describe()})")  # fmt: skip
            elif age >= expiry:
                self._say(f"note: taking over the lease of study '{self.study}' from a driver silent for {age:.0f}s "
                          f"({held.describe()})")  # fmt: skip
            elif waiting_on == (held.driver, held.heartbeat) or (waiting_on is None and age > 1.5 * beat):
                if waiting_on is None:
                    self._say(f"waiting up to {expiry - age:.0f}s: study '{self.study}' is leased to a driver whose "
                              f"last heartbeat was {age:.0f}s ago ({held.describe()}); taking it over if it stays "
                              "silent")  # fmt: skip
                waiting_on = (held.driver, held.heartbeat)
                time.sleep(min(expiry - age, beat / 4, 1.0))
                continue
            else:  # a fresh heartbeat, one that came back while this driver waited, or a new holder
                raise StudyBusy(self._busy(held, age))
            self._since = self._since or time.time()
            self._write(self.client)
            time.sleep(min(beat / 4, 1.0))  # a driver taking it at the same moment writes too; the last wins
            held = self.holder()
            if held is not None and held.driver == self.driver:
                break
        self._thread = threading.Thread(target=self._beat, name="transferlab-lease", daemon=True)
        self._thread.start()

    def _busy(self, held: Holder, age: float) -> str:
        return (
            f"study '{self.study}' is being run by another driver ({held.describe()}, last heartbeat {age:.0f}s ago); "
            f"wait for it to end, or stop it: its lease expires {expiry_s():.0f}s after its last heartbeat"
        )

    def _beat(self) -> None:
        """Rewrite the heartbeat until released; stop, marking the lease lost, if another driver holds it."""
        from mlflow.tracking import MlflowClient

        # A plain client: an outage must not make the heartbeat wait out the retry deadline.
        raw = MlflowClient(self.uri)
        warned = False
        while not self._stop.wait(heartbeat_s()):
            try:
                held = Holder.parse(raw.get_experiment(self.experiment_id).tags.get(TAG_DRIVER_LEASE))
                if held is None or held.driver != self.driver:
                    self.lost = True
                    who = held.describe() if held else "nobody"
                    self._say(f"error: the lease of study '{self.study}' was taken over ({who}); this driver "
                              "leaves the study's runs alone from now on")  # fmt: skip
                    return
                self._write(raw)
                warned = False
            except Exception as e:  # the tracking server is away: try again at the next beat
                if not warned:
                    self._say(f"warning: could not renew the lease of study '{self.study}': {type(e).__name__}")
                    warned = True

    def release(self) -> None:
        """Stop the heartbeat and clear the tag, if this driver still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost or self._thread is None:
            return
        try:
            held = self.holder()
            if held is not None and held.driver == self.driver:
                self.client.set_experiment_tag(self.experiment_id, TAG_DRIVER_LEASE, "")
        except Exception as e:  # it expires on its own
            self._say(f"warning: could not release the lease of study '{self.study}': {type(e).__name__}")

    def __enter__(self) -> StudyLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
