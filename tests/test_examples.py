"""The paper studies in examples/: the full specs plan what their headers say, and their --quick
variants run end to end on the session Ray (plumbing, not findings), including Jain et al.'s
counterfactual follow-up, and feed examples/results.py, which writes the results page."""

import importlib.util
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.planning.plan import build_plan
from orchestrator.spec import SpecError, load_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STUDIES = ("role_of_data", "limits", "data_based")


def _results_module():
    spec = importlib.util.spec_from_file_location("example_results", EXAMPLES / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(300)
def test_full_studies_plan_the_papers_grids():
    role = build_plan(load_spec(EXAMPLES / "role_of_data.yaml"))
    jobs = [(j.source, j.settings.method, j.view.label_noise, j.num_train_samples) for j in role.pretrain_runs]
    # 2 sources x 3 seeds x (3 methods x 3 sizes clean + supervised at 4,000 with noise 0.2 and 0.4)
    assert len(jobs) == 2 * 3 * (3 * 3 + 2)
    assert {m for _, m, _, _ in jobs} == {"supervised", "clip", "simclr"}
    assert {p for _, m, p, _ in jobs if m != "supervised"} == {0.0}  # label noise is swept for supervised only
    sizes = {src: {n for s, _, _, n in jobs if s == src} for src in ("glyphs", "mnist")}
    assert sizes["glyphs"] == sizes["mnist"] == {500, 1500, 4000}  # equal source sizes
    images_seen = {j.num_train_samples * j.settings.epochs for j in role.pretrain_runs}
    assert images_seen == {12_000}  # equal steps at every size
    probes = 66 * 3 * (4 * 3 + 1)  # every model, 3 tasks, 4 few-shot settings x 3 draws + full
    finetunes = 36 * 3 * (4 + 1)  # the clean models at 500 and 4,000 images, one draw + full
    assert role.num_transfer_fits == probes + finetunes
    limits = build_plan(load_spec(EXAMPLES / "limits.yaml"))
    # 2 widths x 4 sizes x 5 epochs and the head weight-decay arm (3 sizes x 2 decays), 3 seeds each
    assert len(limits.pretrain_runs) == 138 and len({j.config_hash for j in limits.pretrain_runs}) == 138
    assert {j.config.head_weight_decay for j in limits.pretrain_runs} == {None, 0.0, 1.0}
    assert limits.num_transfer_fits == 138 * 2 * 4 * 3 * 2  # tasks x shots x draws x layers
    dm = load_spec(EXAMPLES / "data_based.yaml")
    assert (
        dm.datamodels.num_models >= 300
        and dm.datamodels.protocol == "logistic"
        and dm.datamodels.counterfactual.remove_top == (5,)
        and dm.datamodels.counterfactual.seeds >= 16  # paired by seed: the floor per arm
    )
    for name in STUDIES:
        assert load_spec(EXAMPLES / f"{name}.yaml", quick=True).study == f"{name}-quick"
    with pytest.raises(SpecError, match="--quick"):
        load_spec(EXAMPLES / "quickstart.yaml", quick=True)


# Slow (~100 s): the only end-to-end run of the example studies at their --quick sizes (examples/*.yaml: 6 packed
# pretraining trials, a datamodel sweep, its 2-run counterfactual follow-up), then results.py twice.
@pytest.mark.timeout(1800)
def test_quick_studies_run_end_to_end_and_write_the_results_page(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")]
    for name in STUDIES:
        assert main(["run", str(EXAMPLES / f"{name}.yaml"), "--quick", *common]) == 0, name
    client = MlflowClient(uri)
    finished = {}
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert all(r.info.status == "FINISHED" for r in runs), exp.name
        finished[exp.name] = {
            k: sum(r.data.tags.get("transferlab.kind") == k for r in runs) for k in ("pretrain", "transfer")
        }
    assert finished["role_of_data-quick"] == {
        "pretrain": 4,
        "transfer": 4 * 2 * 3,
    }  # 4 models x 2 tasks x (1-shot x 2 + full)
    assert finished["limits-quick"] == {
        "pretrain": 2,
        "transfer": 2 * 2 * 2 * 2,
    }  # 2 models x 2 tasks x 2 shots x 2 layers
    assert finished["data_based-quick-counterfactual"]["pretrain"] == 2  # baseline + harmful K=1, one seed
    assert "planning the follow-up of 'data_based-quick'" in capsys.readouterr().out

    out = tmp_path / "docs" / "results.md"
    assert _results_module().main([f"{n}-quick={uri}" for n in STUDIES] + ["--out", str(out)]) == 0
    page = out.read_text()
    for title in ("Entezari", "Abnar", "Jain"):
        assert f"## {title}" in page
    for claim in (  # the claims the example files declare, and the Jain section's
        "in-domain source helps few-shot",
        "downstream error saturates",
        "the planted class helps",
        "removing harmful classes helps",
    ):
        assert claim in page
    assert page.count("verdict: **") >= 6
    assert "transferlab run examples/data_based.yaml --quick" in page
    figures = [line.split("(")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
    assert figures and all((out.parent / f).is_file() for f in figures)
    assert "| effect decided at 80% power |" in page  # what each interval's width can decide

    # A study not given keeps its section of the page, marked as not rerun, in the page's order.
    results = _results_module()
    assert results.main([f"role_of_data-quick={uri}", "--out", str(out)]) == 0
    again = out.read_text()
    titles = [line for line in again.splitlines() if line.startswith("## ")]
    assert [t.split()[1] for t in titles] == ["Summary", "Entezari", "Abnar", "Jain"]
    for title in ("Abnar", "Jain"):
        section = again.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert section.count(results.KEPT_NOTE.strip()) == 1
        assert section.split(results.KEPT_NOTE, 1)[1].strip() in page  # carried over verbatim
    # Their verdicts stay in the summary, said to be the previous page's.
    summary = again.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "| removing harmful classes helps | " in summary and "(previous page; not rerun) |" in summary
