"""The tracking-outage deadline is the study's, not a process's: a trial started late in an
outage gives up when the outage (not its own waiting) reaches the deadline, and no trial starts
work past it. Real processes against a tracking URI nobody listens on; no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.execution.phase import TrialContext
from orchestrator.records import retry

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DOWN = "http://127.0.0.1:9"  # nobody listens: connection refused
DEADLINE = 4.0


def _wave(env: dict) -> tuple[float, str]:
    """A process of the study (as a new trial is) calling MLflow until it gives up: (seconds, stderr)."""
    code = (
        "from mlflow.tracking import MlflowClient\n"
        "from orchestrator.records import retry\n"
        f"retry.RetryingClient(MlflowClient({DOWN!r}), {DOWN!r}).search_experiments()\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "TrackingUnavailable: tracking server http://127.0.0.1:9 unreachable for" in proc.stderr, proc.stderr
    return time.monotonic() - t0, proc.stderr


def test_a_later_wave_of_trials_does_not_wait_the_deadline_again(tmp_path, monkeypatch):
    clock = retry.outage_clock(str(tmp_path / "storage"), DOWN)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        retry.DEADLINE_ENV: str(DEADLINE),
        retry.OUTAGE_CLOCK_ENV: clock,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    first, _ = _wave(env)  # the first trial to see the outage waits the whole deadline
    assert DEADLINE <= first < DEADLINE + 20
    second, err = _wave(env)  # a trial of the next wave: the outage is already that old
    startup = 8.0  # a Python process importing MLflow on a busy 2-core machine
    assert second < first and second < startup, (first, second)
    assert "retrying for up to 0s" in err

    # Nor does a trial start work, and the driver starts no further phase or search.
    monkeypatch.setenv(retry.DEADLINE_ENV, str(DEADLINE))
    monkeypatch.setenv(retry.OUTAGE_CLOCK_ENV, clock)
    ctx = TrialContext(study="s", tracking_uri=DOWN, experiment_id="1", storage_path=str(tmp_path / "storage"),
                       mlflow_env={retry.DEADLINE_ENV: str(DEADLINE), retry.OUTAGE_CLOCK_ENV: clock})  # fmt: skip
    with pytest.raises(retry.TrackingUnavailable, match=r"unreachable for \d+s \(deadline"):
        ctx.begin_trial()

    # The store answers again (the first successful call, in any process): the clock is cleared.
    retry.reset_outage_clock()
    assert not Path(clock).exists()
    assert ctx.begin_trial() is True
