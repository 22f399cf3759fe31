"""Where a run's results came from: who ran it, which commit of which code, which transferlab.

Every run transferlab creates carries these as tags (MLflow's own ``mlflow.user`` and
``mlflow.source.git.commit``, so the UI shows them in its columns), computed once by the driver
and handed to its trials. A job submitted to a cluster runs from an uploaded copy without
``.git``: ``submit`` passes the commit in the job's environment (:data:`COMMIT_ENV`).
"""

from __future__ import annotations

import ast
import getpass
import hashlib
import os
import subprocess
from pathlib import Path

import orchestrator
from orchestrator.records.schema import (
    TAG_CODE_DIGEST,
    TAG_CODE_VERSION,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_SOURCE_NAME,
    TAG_USER,
)

COMMIT_ENV, DIRTY_ENV = "TRANSFERLAB_GIT_COMMIT", "TRANSFERLAB_GIT_DIRTY"
PROJECT = Path(orchestrator.__file__).resolve().parents[1]


def git_state(root: Path = PROJECT) -> tuple[str, bool] | None:
    """(commit, whether tracked files differ from it) of the checkout holding ``root``; None
    outside git. The environment's :data:`COMMIT_ENV` wins (a submitted job has no ``.git``)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV], os.environ.get(DIRTY_ENV, "false") == "true"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status.strip())) if commit else None


# The code that decides what a run computes: its digest changes with it, not with the orchestrator.
RESULT_CODE = ("trainers", "datasets_")


def code_digest(root: Path = PROJECT) -> str:
    """A digest of the code under :data:`RESULT_CODE`, from each module's syntax tree without its
    docstrings: an edit that changes what runs changes it; comments, docstrings and formatting
    do not."""
    h = hashlib.sha256()
    for package in RESULT_CODE:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (
                    isinstance(body, list)
                    and body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(getattr(body[0], "value", None), ast.Constant)
                    and isinstance(body[0].value.value, str)
                ):
                    node.body = body[1:] or [ast.Pass()]
            h.update(f"{path.relative_to(root).as_posix()}\0{ast.dump(tree)}\0".encode())
    return h.hexdigest()[:16]


def provenance_tags() -> dict[str, str]:
    """The tags every run of this process gets."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    tags = {TAG_USER: user, TAG_CODE_VERSION: orchestrator.__version__, TAG_SOURCE_NAME: "transferlab",
            TAG_CODE_DIGEST: code_digest()}  # fmt: skip
    git = git_state()
    if git is not None:
        tags[TAG_GIT_COMMIT], tags[TAG_GIT_DIRTY] = git[0], str(git[1]).lower()
    return tags


def job_env(root: Path) -> dict[str, str]:
    """What a job submitted from ``root`` (the uploaded project) needs to tag its runs with the
    commit of that checkout (none outside git)."""
    git = git_state(root)
    return {} if git is None else {COMMIT_ENV: git[0], DIRTY_ENV: str(git[1]).lower()}
