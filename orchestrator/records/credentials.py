"""MLflow credentials: how the driver's reach every Ray process that writes to MLflow, never
printed, logged or stored on the way.

A ``user:TOKEN@`` tracking URI is split into a bare URI and the client's environment variables
(:func:`split_credentials`); those and the other :data:`MLFLOW_CLIENT_ENV` variables travel to
trials inside their phase context (Ray's object store) and are applied to the worker's
environment there (:func:`apply_mlflow_client_env`).
"""

from __future__ import annotations

import os

# MLflow client settings that the driver may hold and that every Ray process talking to MLflow
# (pretraining and transfer trials, the Train controller's report callback) needs as well:
# basic-auth or token credentials and TLS options of a shared tracking server. They are secrets:
# they travel to trials inside the phase context (Ray's object store), are applied to the
# process environment there, and are never printed, logged, or recorded as MLflow params/tags.
MLFLOW_CLIENT_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    # Not a secret, but every process writing to MLflow must give up on an outage together.
    "TRANSFERLAB_TRACKING_DEADLINE_S",
    "TRANSFERLAB_OUTAGE_CLOCK",  # where the study's outage started (records.retry)
)


def mlflow_client_env() -> dict[str, str]:
    """The :data:`MLFLOW_CLIENT_ENV` variables set in this process (for shipping to workers)."""
    return {k: os.environ[k] for k in MLFLOW_CLIENT_ENV if os.environ.get(k)}


def apply_mlflow_client_env(env: dict[str, str]) -> None:
    """Make a worker's MLflow clients use the driver's credentials (see :data:`MLFLOW_CLIENT_ENV`).

    Needed even on a cluster whose pods carry them: a Ray started before the variables were set
    (a notebook, a test session, a ``ray start`` node) does not pass them to its workers.
    """
    os.environ.update({k: v for k, v in env.items() if k in MLFLOW_CLIENT_ENV})


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``http://user:TOKEN@host`` -> (``http://host``, MLflow client credentials as env vars).

    Credentials then travel only where secrets do (``PhaseContext.mlflow_env``), never inside a
    URI that Ray or Tune may save to storage or print.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, {}
    host = parts.netloc.rsplit("@", 1)[1]
    env = {}
    if parts.username:
        env["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=host)), env
