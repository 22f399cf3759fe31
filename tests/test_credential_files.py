"""MLflow credentials in a Ray phase: trials get them (from a file named by
``MLFLOW_TRACKING_PASSWORD_FILE``, or from the driver's environment), and none of the values
reaches Tune's files under the storage path or Ray's session logs. Real Ray, real Tune."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.execution.phase import TrialContext, run_phase
from orchestrator.records.credentials import load_credential_files, mlflow_client_env

pytestmark = pytest.mark.timeout(300)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _password_trial(config, ctx):
    """What a trial sees once it has begun: a digest of its MLflow password (never the value)."""
    from ray import tune

    ctx.begin_trial()
    print("trial started with MLflow settings", sorted(ctx.mlflow_env))  # lands in Ray's worker logs
    tune.report({"password_sha256": _digest(os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))})


def _phase(tmp_path: Path, name: str) -> dict:
    ctx = TrialContext(
        study=name,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_id="0",
        storage_path=str(tmp_path / "storage"),
        mlflow_env=mlflow_client_env(),
    )
    progress = run_phase(name, _password_trial, "trial", {"a": "a", "b": "b"}, ctx, 1, 2, lambda r: "")
    assert progress.done == 2, progress.errors
    return ctx.mlflow_env, {r["password_sha256"] for r in progress.results}


def test_trials_get_mlflow_credentials_and_no_value_reaches_storage_or_ray_logs(ray_cluster, tmp_path, monkeypatch):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    t0 = time.time()
    by_file, by_env = f"planted-file-password-{uuid.uuid4().hex}", f"planted-env-password-{uuid.uuid4().hex}"
    secret = tmp_path / "mounted-secret" / "mlflow-password"
    secret.parent.mkdir()
    secret.write_text(by_file + "\n")

    # A mounted Secret: the driver reads it, trials get only its path and read it on their node.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "stale")  # the file wins; restored afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret))
    load_credential_files()
    shipped, seen = _phase(tmp_path, "by-file")
    assert shipped == {"MLFLOW_TRACKING_PASSWORD_FILE": str(secret)}
    assert seen == {_digest(by_file)}

    # The driver's environment: the value travels in the phase context (object store), not in
    # Tune's param_space or its saved state.
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD_FILE")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", by_env)
    shipped, seen = _phase(tmp_path, "by-env")
    assert shipped == {"MLFLOW_TRACKING_PASSWORD": by_env} and seen == {_digest(by_env)}

    import ray

    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in (tmp_path / "storage").rglob("*") if p.is_file()]
    files += [p for p in session_logs.rglob("*") if p.is_file() and p.stat().st_mtime >= t0 - 1]
    assert any(p.name == "tuner.pkl" for p in files) and any("worker" in p.name for p in files)
    assert any(b"trial started with MLflow settings" in p.read_bytes() for p in files)  # the scan sees trial output
    leaks = [(str(p), v) for p in files for v in (by_file, by_env) if v.encode() in p.read_bytes()]
    assert not leaks, leaks
