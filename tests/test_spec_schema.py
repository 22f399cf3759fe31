"""`transferlab schema`: a JSON Schema that editors can use, which accepts every study file the
reader accepts and flags typos and wrong types as you type."""

import glob
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import best_match

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]


def _schema(capsys) -> jsonschema.Draft202012Validator:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_study_the_project_ships_is_valid_under_the_schema(capsys):
    v = _schema(capsys)
    studies = sorted(glob.glob(str(REPO / "examples" / "*.yaml")))
    assert len(studies) >= 4  # quickstart and the three paper studies (datamodels included)
    for path in studies:
        doc = yaml.safe_load(Path(path).read_text())
        assert best_match(v.iter_errors(doc)) is None, path


@pytest.mark.parametrize(
    "name, where",
    [
        ("epoch_typo", ["pretrain"]),
        ("source_url_typo", ["sources", "mnist"]),
        ("unknown_top_key_typo", []),
        ("epochs_string", ["pretrain", "epochs"]),
        ("use_gpu_string", ["resources", "use_gpu"]),
    ],
)
def test_typos_and_wrong_types_are_flagged_where_they_are(capsys, name, where):
    v = _schema(capsys)
    doc = yaml.safe_load((REPO / "tests" / "bad_specs" / f"{name}.yaml").read_text())
    error = best_match(v.iter_errors(doc))
    assert error is not None and list(error.path) == where
    assert main(["validate", str(REPO / "tests" / "bad_specs" / f"{name}.yaml")]) == 2  # the reader agrees
