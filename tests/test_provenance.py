"""Results that know the code they came from: the digest of trainers/ and datasets_/ that every
run carries, and what changes it."""

import shutil

from orchestrator.records.provenance import PROJECT, RESULT_CODE, code_digest


def _copy(tmp_path):
    for package in RESULT_CODE:
        shutil.copytree(PROJECT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_digest_follows_what_runs_not_how_it_is_written(tmp_path):
    root = _copy(tmp_path)
    assert code_digest(root) == code_digest(PROJECT)
    views = root / "datasets_" / "views.py"
    source = views.read_text()
    # A comment, a docstring and reformatting compute the same thing.
    views.write_text(source.replace('"""Data interventions', '"""Reworded: data interventions', 1) + "\n# a note\n")
    assert code_digest(root) == code_digest(PROJECT)
    # A changed constant in a loop does not.
    views.write_text(source.replace("2.0**64", "2.0**63", 1))
    assert code_digest(root) != code_digest(PROJECT)
