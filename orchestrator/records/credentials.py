"""MLflow credentials: how the driver's reach every Ray process that writes to MLflow, never
printed, logged or stored on the way.

A ``user:TOKEN@`` tracking URI is split into a bare URI and the client's environment variables
(:func:`split_credentials`); those and the other :data:`MLFLOW_CLIENT_ENV` variables travel to
trials inside their phase context (Ray's object store) and are applied to the worker's
environment there (:func:`apply_mlflow_client_env`).

Credentials may also be files (a mounted Kubernetes Secret): ``MLFLOW_TRACKING_PASSWORD_FILE``
names the file holding ``MLFLOW_TRACKING_PASSWORD``, and so for the username and the token
(:data:`CREDENTIAL_FILES`). Then only the file's *path* travels to trials, each reads the file on
its own node, and the secret never crosses Ray. (S3 credentials need nothing of ours: pyarrow's
AWS SDK reads the file ``AWS_SHARED_CREDENTIALS_FILE`` names.)
"""

from __future__ import annotations

import os
from pathlib import Path

# MLflow credential variable -> the variable naming a file that holds it (a mounted Secret).
CREDENTIAL_FILES = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME_FILE",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD_FILE",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN_FILE",
}
# A credential file is a few bytes; a larger one is a wrong path, not a password.
MAX_CREDENTIAL_FILE_BYTES = 64 * 1024

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
    *CREDENTIAL_FILES.values(),  # paths, not secrets: each process reads the file itself
    # Not a secret, but every process writing to MLflow must give up on an outage together.
    "TRANSFERLAB_TRACKING_DEADLINE_S",
    "TRANSFERLAB_OUTAGE_CLOCK",  # where the study's outage started (records.retry)
)


def mlflow_client_env() -> dict[str, str]:
    """The :data:`MLFLOW_CLIENT_ENV` variables set in this process (for shipping to workers); a
    credential read from a file travels as its ``*_FILE`` path only, never as its value."""
    env = {k: os.environ[k] for k in MLFLOW_CLIENT_ENV if os.environ.get(k)}
    return {k: v for k, v in env.items() if CREDENTIAL_FILES.get(k) not in env}


def read_credential_files(env: dict[str, str]) -> dict[str, str]:
    """The credentials held in the files that ``env``'s ``*_FILE`` variables name
    (:data:`CREDENTIAL_FILES`), without a trailing newline. ``ValueError`` naming the variable and
    the path if a file cannot be read, is empty or is too large to be a credential."""
    values = {}
    for name, file_var in CREDENTIAL_FILES.items():
        path = env.get(file_var)
        if not path:
            continue
        try:
            size = Path(path).stat().st_size
            if size > MAX_CREDENTIAL_FILE_BYTES:
                raise ValueError(f"{file_var}: {path}: holds {size} bytes, too many for a credential")
            value = Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"{file_var}: {path}: cannot read it ({e.strerror or e})") from None
        if not value:
            raise ValueError(f"{file_var}: {path}: is empty")
        values[name] = value
    return values


def load_credential_files() -> None:
    """Set this process's MLflow credentials from the files its ``*_FILE`` variables name (a
    file wins over a variable set too: it is the mounted Secret, kept current by Kubernetes)."""
    os.environ.update(read_credential_files(dict(os.environ)))


def apply_mlflow_client_env(env: dict[str, str]) -> None:
    """Make a worker's MLflow clients use the driver's credentials (see :data:`MLFLOW_CLIENT_ENV`),
    reading those given as files on this node (a value given too, from a ``user:TOKEN@`` URI, wins).

    Needed even on a cluster whose pods carry them: a Ray started before the variables were set
    (a notebook, a test session, a ``ray start`` node) does not pass them to its workers.
    """
    os.environ.update({k: v for k, v in env.items() if k in MLFLOW_CLIENT_ENV})
    os.environ.update({k: v for k, v in read_credential_files(env).items() if k not in env})


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
