"""Hostile and malformed study files: every file of ``tests/bad_specs/`` is refused with exit 2 and
one line naming the field and the problem — by ``validate`` and by ``run`` — with no traceback
and nothing written to MLflow or to storage.

Each corpus file says what it tries and the message fragment expected, on its first two lines::

    # expect: pretrain.epochs: must be >= 1, got 0
    # tries: zero epochs

Every case runs through ``orchestrator.cli.main`` in-process (the function the console script
calls; an exception escaping it would fail the test as the traceback a user would see); a
representative subset also runs through the installed ``transferlab`` console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main

CORPUS_DIR = Path(__file__).parent / "bad_specs"
CORPUS = sorted(CORPUS_DIR.glob("*.yaml"))
# Through the real console script, in a fresh process: YAML attacks, bytes, data-dependent checks.
SUBPROCESS_CASES = {
    "python_object_apply": ("validate", "run"),
    "alias_bomb": ("validate",),
    "not_utf8": ("validate",),
    "duplicate_source_name": ("validate",),
    "shots_above_smallest_class": ("run",),
}


def expectation(path: Path) -> tuple[str, str]:
    """(expected message fragment, what the file tries) from a corpus file's first two lines."""
    head = path.read_bytes().split(b"\n", 2)
    expect, tries = (line.decode().split(":", 1)[1].strip() for line in head[:2])
    return expect, tries


def _store_and_storage_absent(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.iterdir()) == [], "something was written: " + ", ".join(
        p.name for p in cwd.iterdir()
    )


def test_the_corpus_is_large_and_self_describing():
    assert len(CORPUS) >= 50
    for path in CORPUS:
        expect, tries = expectation(path)
        assert expect and tries, path.name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_spec_is_refused_in_one_line(path, tmp_path, monkeypatch, capsys):
    expect, _ = expectation(path)
    monkeypatch.chdir(tmp_path)  # MLflow's default store and the default storage would land here
    for command in ("validate", "run"):
        code = main([command, str(path)])
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (command, err)
        assert expect in err, (command, err)
        assert "Traceback" not in err
    _store_and_storage_absent(tmp_path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_console_script_refuses_bad_specs(name, tmp_path):
    path = CORPUS_DIR / f"{name}.yaml"
    expect, _ = expectation(path)
    script = Path(sys.executable).parent / "transferlab"
    for command in SUBPROCESS_CASES[name]:
        proc = subprocess.run(
            [str(script), command, str(path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=150,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and expect in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    _store_and_storage_absent(tmp_path)
