"""Studies as Ray jobs: ``transferlab submit / status / logs / stop`` through the Ray Jobs API.

``submit`` validates the study here, stages a copy of the project (the files git would track,
without data, virtual environments or local MLflow stores) with the study file, overrides
applied, in it, and submits ``transferlab run STUDY --address auto`` on it to the cluster's job
server (the dashboard, ``http://HOST:8265``). Where the study's results go is decided here, so
that the cluster can reach it (:func:`cluster_tracking_uri`, :func:`cluster_storage`).

Secrets: the Ray token (``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH``) only ever goes into
the HTTP ``Authorization`` header of this client; the job's driver gets the cluster's own token
from its node, so the token is never put in the job's runtime_env. Nor, by default, are MLflow
credentials (this environment's, or a ``user:password@`` tracking URI's): Ray stores a job's
runtime_env in the cluster and shows it on its dashboard, and Tune copies it to every trial. The
cluster provides its own (a Kubernetes Secret mounted on every Ray pod, read through
``MLFLOW_TRACKING_PASSWORD_FILE``; see docs/cluster.md); ``--send-credentials`` sends this
environment's in the job's ``env_vars`` anyway (:data:`CREDENTIAL_ENV`, by value), with a
warning. Nothing this module prints contains any secret (:func:`scrub`).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import fnmatch
import hashlib
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from packaging.requirements import Requirement

from datasets_.objstore import is_remote
from orchestrator.records.credentials import CREDENTIAL_FILES, mlflow_client_env, split_credentials
from orchestrator.records.provenance import job_env
from orchestrator.records.retry import redact
from orchestrator.records.tracker import resolve_tracking_uri
from orchestrator.spec import DEFAULT_STORAGE, SpecError, StudySpec

# Ray refuses a working_dir package over 512 MiB; checked here, before compression, with a
# message that names the largest files.
MAX_WORKING_DIR_BYTES = 512 * 1024 * 1024
# How long submit waits for the job agent of a cluster that has just started.
AGENT_WAIT_S = 120.0
# Never uploaded even where no .gitignore lists them: data, environments, local stores, outputs.
EXCLUDED_NAMES = {
    ".git",
    ".venv",
    "venv",
    "env",
    "data",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "transferlab_storage",
    "reports",
    "__pycache__",
    ".pytest_cache",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
}
# Never uploaded even if git tracks them: files that hold secrets by name (deploy/mlflow/.env holds
# the MLflow, MinIO and PostgreSQL passwords), matched against every part of a path. Python source
# is code, whatever its name (orchestrator/records/credentials.py must travel).
SECRET_FILES = (".env", ".env.*", "*.pem", "*.key", ".aws", ".ssh", "*credentials*", ".netrc", ".pgpass",
                "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*")  # fmt: skip
SECRET_ENV = ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY")
# MLflow credentials submit sends only with --send-credentials (the username too: the cluster's own
# password must not be paired with this machine's username).
CREDENTIAL_ENV = tuple(CREDENTIAL_FILES)
NOT_SENT = (
    "MLflow credentials of this environment are not sent with the job (Ray's dashboard would show "
    "them): the cluster must have its own (a Secret on every Ray pod: MLFLOW_TRACKING_USERNAME_FILE / "
    "MLFLOW_TRACKING_PASSWORD_FILE, see docs/cluster.md), or submit with --send-credentials"
)
SENT = (
    "MLflow credentials go in the job's env_vars (--send-credentials): whoever reaches the cluster's "
    "dashboard or job API can read them, and Tune copies them to every trial"
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")


@dataclass
class Submission:
    """What ``submit`` sends: everything but the staged folder is shown to the user."""

    submission_id: str  # the base id; attempts after a finished one get -2, -3, ...
    entrypoint: str
    env_vars: dict[str, str]
    study_path: str  # inside the working dir
    tracking_uri: str
    storage: str
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    pip: list[str] = field(default_factory=list)
    # MLflow credentials this environment holds, named (never their values): sent in env_vars
    # with --send-credentials, else withheld
    credentials: list[str] = field(default_factory=list)


def scrub(text: str) -> str:
    """``text`` without URI credentials and without the value of any secret set in this process."""
    text = redact(text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    token = ray_token()
    return text.replace(token, "***") if token and len(token) >= 4 else text


def ray_token() -> str | None:
    """The Ray token this client authenticates with: ``RAY_AUTH_TOKEN``, else the file named by
    ``RAY_AUTH_TOKEN_PATH``, else Ray's default ``~/.ray/auth_token`` (as Ray's own clients do)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def job_api_url(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise SpecError(
            "--address", "give the cluster's job API, e.g. http://HOST:8265 (or set RAY_API_SERVER_ADDRESS)"
        )
    return address.rstrip("/") if "://" in address else f"http://{address.rstrip('/')}"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str | None):
    """A ``JobSubmissionClient`` for the job API at ``address``; one-line ``SpecError`` if it does
    not answer or refuses us. The address given wins over ``RAY_ADDRESS`` (which Ray's client
    would otherwise prefer, and which usually names the GCS, not the job API)."""
    from ray.job_submission import JobSubmissionClient

    url = job_api_url(address)
    token = ray_token()
    warning = plaintext_token_warning(url, token)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # ConnectionError, requests errors, Ray's AuthenticationError, HTTP errors
        raise SpecError("--address", f"cannot use the Ray job API at {url}: {_reason(e)}") from None
    finally:
        os.environ.update(saved)


def plaintext_token_warning(url: str, token: str | None) -> str | None:
    """Why sending ``token`` to ``url`` exposes it (plain http to another machine), or None."""
    parsed = urllib.parse.urlsplit(url)
    if not token or parsed.scheme != "http":
        return None
    host = parsed.hostname or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name other than localhost
    return (
        f"the Ray token goes to {host} over plain http, readable on the network; put the job API "
        "behind https, or reach it through an SSH tunnel or `kubectl port-forward` on localhost"
    )


def _reason(e: Exception) -> str:
    text = str(e)
    low = text.lower()
    if "401" in low or "no authentication token" in low or "couldn't find an authentication token" in low:
        return "the cluster needs a token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
    if "403" in low or "invalid authentication token" in low:
        return "the cluster refused the token in RAY_AUTH_TOKEN"
    if "connection refused" in low or "failed to connect" in low or "max retries exceeded" in low:
        return "connection refused (is the dashboard running, and is the port forwarded?)"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return scrub(first)[:300]


def cluster_tracking_uri(given: str | None, loopback: bool) -> tuple[str, dict[str, str]]:
    """The tracking URI the job uses, without credentials, and the credentials it carried.

    A sqlite or file store is a file on this machine: fine for a cluster on this machine (the
    path is made absolute here), refused for any other, which could not reach it.
    """
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    local = uri is None or "://" not in uri or uri.startswith(("sqlite:", "file:"))
    if local and not loopback:
        shown = redact(uri) if uri else "MLflow's default store (sqlite:///mlflow.db in this folder)"
        raise SpecError(
            "--tracking-uri",
            f"{shown} is a file on this machine, which the cluster cannot reach; "
            "give a tracking server it can reach (http(s)://HOST:PORT)",
        )
    try:
        resolved = resolve_tracking_uri(uri)
    except ValueError as e:
        raise SpecError("--tracking-uri", str(e)) from None
    return split_credentials(resolved)


def cluster_storage(given: str | None, loopback: bool) -> str:
    """Where the job's checkpoints go: a URI or an absolute path as given; a relative path (or
    the default) is resolved here for a cluster on this machine and refused for any other."""
    if given and (is_remote(given) or Path(given).is_absolute()):
        return given
    if not loopback:
        raise SpecError(
            "--storage-path",
            f"{given or 'the default ./' + DEFAULT_STORAGE} is a folder on this machine; give "
            "storage every node of the cluster reads and writes (s3://BUCKET/PATH, gs://..., or an "
            "absolute path on a shared mount)",
        )
    return str(Path(given or DEFAULT_STORAGE).resolve())


def local_stores(sub: Submission) -> tuple[str | None, str | None]:
    """(tracking URI, storage) of ``sub`` that are files on this machine, to check here before
    submitting to a cluster on this machine; an http(s) server may be a name only the cluster
    resolves (a port-forwarded cluster looks like loopback too), so it is not contacted."""
    tracking = sub.tracking_uri if sub.tracking_uri.startswith(("sqlite:", "file:")) else None
    storage = sub.storage if not is_remote(sub.storage) else None
    return tracking, storage


def project_files(root: Path) -> list[str]:
    """Files of ``root`` to upload, relative: what git tracks or would track (``.gitignore``
    respected), or every file outside git; never :data:`EXCLUDED_NAMES` nor :data:`SECRET_FILES`."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    keep = []
    for n in sorted(set(names)):
        parts = Path(n).parts
        if any(p in EXCLUDED_NAMES or p.endswith(".egg-info") or is_secret(p) for p in parts):
            continue
        if (root / n).is_file() and not (root / n).is_symlink():
            keep.append(n)
    return keep


def is_secret(name: str) -> bool:
    """Whether a file or folder name is one that holds secrets (:data:`SECRET_FILES`)."""
    return not name.endswith(".py") and any(fnmatch.fnmatch(name.lower(), pattern) for pattern in SECRET_FILES)


def upload_summary(files: list[str], shown: int = 12) -> str:
    """What travels, as the top-level entries with their file counts (the first ``shown``)."""
    counts: dict[str, int] = {}
    for f in files:
        top = f.split("/", 1)[0] + ("/" if "/" in f else "")
        counts[top] = counts.get(top, 0) + 1
    items = [f"{top} ({n})" if top.endswith("/") else top for top, n in counts.items()]
    more = f", ... {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def check_size(root: Path, files: list[str], limit: int = MAX_WORKING_DIR_BYTES) -> int:
    sizes = {n: (root / n).stat().st_size for n in files}
    total = sum(sizes.values())
    if total > limit:
        top = sorted(sizes, key=sizes.get, reverse=True)[:3]
        biggest = ", ".join(f"{n} ({sizes[n] / 2**20:.0f} MiB)" for n in top)
        raise SpecError(
            "--working-dir",
            f"{root} holds {total / 2**20:.0f} MiB to upload, over Ray's "
            f"{limit / 2**20:.0f} MiB limit; largest: {biggest}. List data in .gitignore or move it out "
            "(datasets belong on storage the cluster reads: s3://..., a shared mount)",
        )
    return total


def _staged_study(spec: StudySpec, study_file: Path, root: Path, files: list[str], loopback: bool) -> tuple[str, dict]:
    """Where the study goes in the working dir, and its document with local dataset paths the
    cluster can open: absolute (a cluster on this machine), or relative to the staged study file
    and among the uploaded files (any other cluster; absolute paths stay, as shared mounts)."""
    study_file = study_file.resolve()
    inside = study_file.is_relative_to(root)
    rel = str(study_file.relative_to(root)) if inside else f"{spec.study}.yaml"
    doc = copy.deepcopy(spec.raw)
    uploaded = {str(root / f) for f in files}
    for section, refs in (("sources", spec.sources), ("tasks", spec.tasks)):
        for name, ref in refs.items():
            body = doc[section][name]
            written = body if isinstance(body, str) else body["uri"]
            if is_remote(ref.uri) or ref.uri.startswith("builtin:") or Path(written).is_absolute():
                continue
            if loopback:
                uri = ref.uri
            else:
                travels = any(u == ref.uri or u.startswith(ref.uri.rstrip("/") + "/") for u in uploaded)
                if not inside or not travels:
                    raise SpecError(
                        f"{section}.{name}.uri",
                        f"{written} is not among the files uploaded from {root}; "
                        "give data the cluster reads (builtin:NAME, s3://..., an absolute path on a shared mount)",
                    )
                uri = os.path.relpath(ref.uri, (root / rel).parent)
            doc[section][name] = uri if isinstance(body, str) else {**body, "uri": uri}
    doc.pop("tracking_uri", None), doc.pop("storage_path", None)  # decided here, passed explicitly
    return rel, doc


def build_submission(
    spec: StudySpec,
    study_file: str,
    working_dir: str,
    tracking_uri: str | None,
    storage_path: str | None,
    loopback: bool,
    pip_pinned: bool = False,
    send_credentials: bool = False,
) -> tuple[Submission, dict]:
    """The job to submit (pure but for reading the project's file list) and the study document.
    MLflow credentials (this environment's and the tracking URI's) go in its ``env_vars`` only
    with ``send_credentials``; ``Submission.credentials`` names those there were."""
    root = Path(working_dir).resolve()
    uri, uri_credentials = cluster_tracking_uri(tracking_uri or spec.tracking_uri, loopback)
    storage = cluster_storage(storage_path or spec.storage_path, loopback)
    files = project_files(root)
    size = check_size(root, files)
    rel, doc = _staged_study(spec, Path(study_file), root, files, loopback)
    digest = hashlib.sha256(repr((sorted(_flat(doc)), uri, storage)).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", spec.study.lower()).strip("-")[:40] or "study"
    entrypoint = shlex.join(
        ["transferlab", "run", rel, "--address", "auto", "--tracking-uri", uri, "--storage-path", storage, "--verbose"]
    )
    # The uploaded copy has no .git: its commit travels in the environment, to tag every run.
    # Credentials by value (read from their *_FILE if given: those paths are this machine's files).
    held = {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)} | uri_credentials
    settings = {k: v for k, v in mlflow_client_env().items() if k not in CREDENTIAL_FILES.values()}
    client_env = {k: v for k, v in settings.items() if k not in CREDENTIAL_ENV} | (held if send_credentials else {})
    env = {"MLFLOW_TRACKING_URI": uri, **client_env, **job_env(root)}
    sub = Submission(
        f"transferlab-{slug}-{digest}",
        entrypoint,
        env,
        rel,
        uri,
        storage,
        files,
        size,
        pinned_requirements() if pip_pinned else [],
        sorted(held),
    )
    return sub, doc


def _flat(d, prefix=""):
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in _flat(v, f"{prefix}{k}.")]
    return [(prefix, repr(d))]


def pinned_requirements() -> list[str]:
    """transferlab's dependencies pinned to the versions installed here (ray left out: the
    cluster's Ray is the one that runs, and must equal the client's)."""
    out = []
    for line in requires("transferlab") or []:
        req = Requirement(line)
        if req.name.lower() == "ray" or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            out.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            continue
    return out


def stage(sub: Submission, doc: dict, working_dir: str) -> str:
    """A temporary folder holding the project's files and the study document (caller removes)."""
    root = Path(working_dir).resolve()
    out = Path(tempfile.mkdtemp(prefix="transferlab-submit-"))
    for name in sub.files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, out / name)
    (out / sub.study_path).parent.mkdir(parents=True, exist_ok=True)
    (out / sub.study_path).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(out)


def active_attempt(client, base: str) -> tuple[str | None, str]:
    """(the id of an attempt of ``base`` still pending or running, or None; the id to submit)."""
    ids = {j.submission_id: str(j.status) for j in client.list_jobs() if (j.submission_id or "").startswith(base)}
    attempts = [base] + [f"{base}-{i}" for i in range(2, len(ids) + 3)]
    running = next((a for a in attempts if status_name(ids.get(a)) in ACTIVE), None)
    return running, next(a for a in attempts if a not in ids)


def status_name(status) -> str | None:
    return None if status is None else str(getattr(status, "value", status)).split(".")[-1]


def submit(client, sub: Submission, staged: str, agent_wait_s: float = AGENT_WAIT_S) -> tuple[str, bool]:
    """Submit unless an attempt of the same study is pending or running: (job id, submitted?).

    A cluster that has just started answers "No available agent to submit job" until its
    head's job agent is up: that is waited out (up to ``agent_wait_s``), not reported."""
    running, new_id = active_attempt(client, sub.submission_id)
    if running:
        return running, False
    runtime_env = {"working_dir": staged, "env_vars": sub.env_vars}
    if sub.pip:
        runtime_env["pip"] = sub.pip
    deadline, said = time.monotonic() + agent_wait_s, False
    while True:
        try:
            return client.submit_job(entrypoint=sub.entrypoint, submission_id=new_id, runtime_env=runtime_env), True
        except RuntimeError as e:
            if "already exists" in str(e):  # another submit of the same study won the race
                return new_id, False
            if "no available agent" not in str(e).lower() or time.monotonic() > deadline:
                raise SpecError("submit", f"the cluster refused the job: {_reason(e)}") from None
            if not said:
                print("the cluster's job agent is not up yet; waiting for it", flush=True)
                said = True
            time.sleep(0.5)


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SpecError("JOB", f"no job '{job_id}' on this cluster") from None
        raise SpecError("JOB", _reason(e)) from None


def describe(info) -> list[str]:
    """``status`` lines of a job: its state, the study command it runs, times, Ray's message."""

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    status = status_name(info.status)
    exit_code = getattr(info, "driver_exit_code", None)
    lines = [
        f"{info.submission_id or info.job_id}: {status}"
        + (f" (exit code {exit_code})" if exit_code is not None else "")
    ]
    lines.append(f"  runs: {scrub(info.entrypoint)}")
    if info.start_time:
        span = f"  started {when(info.start_time)}"
        if info.end_time:
            span += f", ended {when(info.end_time)} ({(info.end_time - info.start_time) / 1000:.0f}s)"
        lines.append(span)
    if info.message:
        lines.append(f"  {scrub(info.message.strip().splitlines()[0])}")
    return lines


def exit_code(info) -> int:
    """The job's outcome as ``transferlab run``'s exit codes: 0 done, 1 runs failed or the job
    failed otherwise, 2/3 as the study's driver said; a stopped job is 130 (as Ctrl-C)."""
    status = status_name(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return 130
    code = getattr(info, "driver_exit_code", None)
    return code if code in (1, 2, 3) else 1


def tail_logs(client, job_id: str, out) -> None:
    """Print the job's log as it grows until the job ends."""

    async def run():
        async for chunk in client.tail_job_logs(job_id):
            out.write(scrub(chunk))
            out.flush()

    asyncio.run(run())
