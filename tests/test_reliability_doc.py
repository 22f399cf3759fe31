"""docs/reliability.md lists exactly what the tests try: its generated tables match the bad-spec
corpus, the shard-attack tests and the infrastructure cases (regenerate with
``python tests/reliability_table.py``)."""

from pathlib import Path

import reliability_table  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]


def test_the_doc_tables_are_generated_from_the_tests():
    text = reliability_table.DOC.read_text()
    assert reliability_table.generated_part(text) == reliability_table.render(), (
        "docs/reliability.md is stale: run `python tests/reliability_table.py`"
    )


def test_every_infrastructure_case_names_a_real_test():
    for _, test, _ in reliability_table.INFRASTRUCTURE + reliability_table.HOSTILE_PATHS:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, test


def test_the_readme_links_the_doc():
    assert "docs/reliability.md" in (ROOT / "README.md").read_text()
