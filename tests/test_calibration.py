"""The claim verdicts are calibrated: on simulated studies with a known truth (benchmarks/calibration.py,
smaller), no claim kind says "reproduced" on null studies significantly more often than 5%, and
no 95% interval covers the truth significantly less than 93% or more than 97% of the time
(binomial tests at p < 0.01); planted effects are found more often than nulls. Every kind of
calibration.PLANTED is checked, the Jain et al. kinds (class_influence, counterfactual_removal) on
their own simulated inputs. And the calibration holds for the real command: a simulated study
written to MLflow in transferlab's schema gets, from the report, the rows claims.evaluate gives on
its frame."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "calibration", Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"
)
calibration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calibration)

STUDIES = 60  # null and planted studies per kind


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(calibration.PLANTED))
def test_claim_kind_is_calibrated(kind):
    r = calibration.run_kind(kind, STUDIES, seed=1)
    assert not calibration.too_many_false_positives(r), calibration.table([r])
    assert r["judged"] >= STUDIES // 2 and not calibration.coverage_off(r), calibration.table([r])
    assert r["planted_reproduced"] > r["null_reproduced"], calibration.table([r])


@pytest.mark.timeout(600)
def test_the_report_on_mlflow_runs_judges_as_claims_evaluate_on_the_frame(tmp_path):
    (r,) = calibration.through_mlflow(1, ["e_ir_falls_with_shots"], seed=0, root=tmp_path)
    assert r["rows"] == 1 and r["same"], r  # the paired bootstrap, hull fits and draws, read back from MLflow
