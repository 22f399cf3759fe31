"""Ray Tune search over fine-tuning hyperparameters (``transfer.finetune.search``) on a real local
Ray and a real MLflow store: ASHA and random search, the chosen config, the trials artifact,
caching on rerun and the plan's trial count. Bad search specs are in tests/bad_specs/."""

import json
import time
from dataclasses import asdict

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.execution.phase import PhaseContext
from orchestrator.execution.search import TRIALS_ARTIFACT, choose, run_search_phase
from orchestrator.planning.plan import build_plan
from orchestrator.planning.transfer_fits import finetune_config, finetune_settings
from orchestrator.records.schema import KIND_STUDY, KIND_TRANSFER, PER_EXAMPLE_ARTIFACT, TAG_KIND
from orchestrator.spec import FinetuneSpec, Resources, SpecError, parse_spec

STEPS = 24
LR, WD = [1e-5, 0.3], [1e-5, 1e-2]


def _spec(search: dict, protocol: str) -> dict:
    return {
        "study": "ftsearch",
        "sources": {"mnist": {"uri": "builtin:mnist"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {
            "model": "tiny-cnn",
            "image_size": 16,
            "epochs": 1,
            "batch_size": 32,
            "sweep": {"pretrain_size": [300]},
        },
        "transfer": {
            "protocol": [protocol],
            "shots": [5],
            "seeds": [0],
            "finetune": {"steps": STEPS, "batch_size": 32, "search": search},
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }


# One config at a time: ASHA is then successive halving in sampling order, so which trials it
# stops is decided by the configs (seeded) and the deterministic training alone.
ASHA = {
    "algorithm": "asha",
    "num_samples": 4,
    "lr": LR,
    "weight_decay": WD,
    "grace_steps": 6,
    "reduction_factor": 2,
    "eval_every": 6,
    "seed": 0,
    "max_concurrent_trials": 1,
}
RANDOM = {"algorithm": "random", "num_samples": 2, "lr": LR, "eval_every": 12, "seed": 1}


def _transfer_runs(client, exp_id):
    return client.search_runs([exp_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_TRANSFER}'", max_results=100)


def _trials(client, run, tmp):
    return json.loads(open(client.download_artifacts(run.info.run_id, TRIALS_ARTIFACT, str(tmp))).read())


def _plan_json(path, common, capsys) -> dict:
    capsys.readouterr()
    assert main(["plan", str(path), *common[:2], "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def searched_study(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftsearch")
    (tmp / "asha.yaml").write_text(yaml.safe_dump(_spec(ASHA, "finetune")))
    (tmp / "random.yaml").write_text(yaml.safe_dump(_spec(RANDOM, "lp_ft")))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return tmp, uri, ["--tracking-uri", uri, "--storage-path", str(tmp / "storage")]


# Slow (~30 s): a pretraining run, 4 ASHA trials one at a time (a seeded stopping order), then a cached rerun.
@pytest.mark.timeout(400)
def test_asha_search_chooses_on_validation_stops_early_and_is_cached_on_rerun(searched_study, capsys):
    tmp, uri, common = searched_study
    plan = _plan_json(tmp / "asha.yaml", common, capsys)
    assert (plan["search_fits"], plan["search_trials"], plan["transfer_trials"], plan["trials"]) == (1, 4, 0, 5)

    assert main(["run", str(tmp / "asha.yaml"), *common]) == 0
    out = capsys.readouterr().out
    assert "[finetune-search 1/1]" in out and "stopped early by ASHA" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ftsearch").experiment_id
    (run,) = _transfer_runs(client, exp)
    m, p = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and p["protocol"] == "finetune" and p["search_algorithm"] == "asha"
    assert LR[0] <= m["learning_rate"] <= LR[1] and WD[0] <= m["weight_decay"] <= WD[1]
    assert 0.0 <= m["accuracy"] <= 1.0 and m["num_train_examples"] == 50

    trials = _trials(client, run, tmp)
    assert trials["algorithm"] == "asha" and len(trials["trials"]) == m["search_trials"] == 4
    for t in trials["trials"]:
        assert LR[0] <= t["lr"] <= LR[1] and WD[0] <= t["weight_decay"] <= WD[1]
        assert [h["step"] for h in t["history"]] == list(range(6, t["steps"] + 1, 6))
    early = [t for t in trials["trials"] if t["steps"] < STEPS]
    assert early and m["search_trials_stopped_early"] == len(early)
    chosen = trials["trials"][trials["chosen"]]
    assert chosen["steps"] == STEPS
    assert chosen["val_accuracy"] == max(t["val_accuracy"] for t in trials["trials"] if t["steps"] == STEPS)
    assert (m["learning_rate"], m["weight_decay"]) == (
        pytest.approx(chosen["lr"]),
        pytest.approx(chosen["weight_decay"]),
    )
    # The retrained network is the chosen trial's: the same validation accuracy.
    assert m["validation_accuracy"] == pytest.approx(chosen["val_accuracy"])
    assert PER_EXAMPLE_ARTIFACT in {a.path for a in client.list_artifacts(run.info.run_id, "outputs")}

    # The same command again: nothing to plan, nothing run, the fit's run untouched.
    assert _plan_json(tmp / "asha.yaml", common, capsys)["trials"] == 0
    assert main(["run", str(tmp / "asha.yaml"), *common]) == 0
    assert "finetune-search" not in capsys.readouterr().out
    (again,) = _transfer_runs(client, exp)
    assert (again.info.run_id, again.info.end_time) == (run.info.run_id, run.info.end_time)
    (study,) = client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{KIND_STUDY}'")
    assert [x.value for x in client.get_metric_history(study.info.run_id, "transfer_fits_run")] == [1.0, 0.0]


# Slow: a second real search (lp_ft, random) on the first test's pretraining checkpoint.
@pytest.mark.timeout(300)
def test_random_search_runs_every_trial_to_the_end(searched_study, capsys):
    tmp, uri, common = searched_study
    assert main(["run", str(tmp / "random.yaml"), *common]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ftsearch").experiment_id
    (run,) = [r for r in _transfer_runs(client, exp) if r.data.params["protocol"] == "lp_ft"]
    m = run.data.metrics
    trials = _trials(client, run, tmp)["trials"]
    assert run.data.params["search_algorithm"] == "random" and "search_grace_steps" not in run.data.params
    assert len(trials) == m["search_trials"] == 2 and m["search_trials_stopped_early"] == 0
    assert all(t["steps"] == STEPS and [h["step"] for h in t["history"]] == [12, 24] for t in trials)
    assert len({t["lr"] for t in trials}) == 2 and all(t["weight_decay"] == FinetuneSpec.weight_decay for t in trials)
    chosen = max(trials, key=lambda t: t["val_accuracy"])
    assert m["learning_rate"] == pytest.approx(chosen["lr"]) and m["validation_accuracy"] == pytest.approx(
        chosen["val_accuracy"]
    )


def test_without_a_search_the_hashed_finetune_settings_are_unchanged():
    assert finetune_config(finetune_settings(FinetuneSpec()), None) == {
        "lr": (1e-3, 1e-2),
        "steps": 100,
        "batch_size": 32,
        "weight_decay": 1e-4,
    }
    spec = parse_spec(_spec({"algorithm": "asha"}, "finetune"))
    s = asdict(spec.transfer.finetune.search)
    assert (s["num_samples"], s["lr"], s["weight_decay"], s["grace_steps"], s["eval_every"]) == (
        8,
        (1e-4, 0.1),
        1e-4,
        6,
        6,
    )
    ft = spec.transfer.finetune
    assert set(finetune_config(finetune_settings(ft), ft.search)) == {"steps", "batch_size", "search"}


def test_choose_prefers_full_length_trials_then_the_first_sampled():
    trials = [
        {"trial": 0, "steps": 24, "val_accuracy": 0.5},
        {"trial": 1, "steps": 6, "val_accuracy": 0.9},
        {"trial": 2, "steps": 24, "val_accuracy": 0.7},
        {"trial": 3, "steps": 24, "val_accuracy": 0.7},
    ]
    assert choose(trials, 24)["trial"] == 2
    assert choose([{"trial": 0, "steps": 6, "val_accuracy": 0.2}], 24)["trial"] == 0


def _context(tmp, **kw) -> PhaseContext:
    plan = build_plan(parse_spec(_spec({**RANDOM, "num_samples": 1}, "finetune")))
    (group,) = plan.transfer_groups
    ctx = PhaseContext(
        study="ftsearch-phase",
        tracking_uri="sqlite:///unused.db",
        experiment_id="0",
        storage_path=str(tmp),
        resources=Resources(),
        **kw,
    )
    ctx.searches = {"a": (group, group.fits[0]), "b": (group, group.fits[0])}
    ctx.checkpoints[group.pretrain_hash] = str(tmp / "no-such-checkpoint")
    return ctx


def test_no_search_starts_after_the_budget_deadline(tmp_path, capsys):
    progress = run_search_phase(_context(tmp_path, deadline=time.time() - 1), {"a": "first", "b": "second"}, 4)
    assert (progress.done, progress.failed, progress.running) == (0, 0, 0)
    assert "0 done, 0 failed, 2 not launched of 2" in capsys.readouterr().out


@pytest.mark.timeout(200)
def test_fail_fast_stops_the_phase_at_the_first_failed_search(ray_cluster, tmp_path, capsys):
    progress = run_search_phase(_context(tmp_path, fail_fast=True), {"a": "first", "b": "second"}, 4)
    out = capsys.readouterr().out
    assert progress.errors == ["first"] and "started second" not in out
    assert "[finetune-search 1/2] first: FAILED: " in out and "1 not launched of 2" in out


def test_finetune_only_limits_fine_tuning_to_the_named_runs_tasks_and_draws():
    """``transfer.finetune.only / tasks / seeds``: the probes cover every run, fine-tuning only the
    runs matching every named axis, on the named tasks, at the named draws ('full' once)."""
    spec = _spec({}, "linear_probe")
    spec["tasks"]["letters"] = {"uri": "builtin:letters"}
    spec["pretrain"]["sweep"] = {"pretrain_size": [300, 600], "label_noise": [0.0, 0.2], "seed": [0, 1]}
    spec["transfer"] = {
        "protocol": ["linear_probe", "finetune"],
        "shots": [1, 5, "full"],
        "seeds": [0, 1, 2],
        "finetune": {"only": {"label_noise": [0.0], "pretrain_size": [600]}, "tasks": ["digits"], "seeds": [0, 2]},
    }
    plan = build_plan(parse_spec(spec))
    runs = {r.config_hash: r.params for r in plan.pretrain_runs}
    tuned = {}
    for g in plan.transfer_groups:
        assert sum(f.protocol == "linear_probe" for f in g.fits) == 2 * 3 + 1  # every run, every task
        fits = [(f.shots, f.seed) for f in g.fits if f.protocol == "finetune"]
        if fits:
            tuned[runs[g.pretrain_hash]["seed"], g.task] = (runs[g.pretrain_hash], fits)
    assert sorted(tuned) == [(0, "digits"), (1, "digits")]  # the clean 600-sample runs of both seeds
    for params, fits in tuned.values():
        assert (params["pretrain_size"], params["label_noise"]) == (600, 0.0)
        assert fits == [(1, 0), (1, 2), (5, 0), (5, 2), ("full", 0)]


@pytest.mark.parametrize(
    "finetune, message",
    [
        ({"only": {"pretrain_size": [700]}}, "transfer.finetune.only.pretrain_size[0]: 700 is not a value of"),
        ({"only": {"noise": [0.0]}}, "transfer.finetune.only.'noise': is not a pretrain.sweep axis"),
        ({"only": [0.0]}, "transfer.finetune.only: must be a mapping of pretrain.sweep axis -> values"),
        ({"tasks": ["letters"]}, "transfer.finetune.tasks[0]: unknown value 'letters'"),
        ({"seeds": [3]}, "transfer.finetune.seeds[0]: 3 is not one of transfer.seeds (0)"),
    ],
)
def test_finetune_subset_must_name_what_the_study_has(finetune, message):
    spec = _spec({}, "finetune")
    spec["transfer"]["finetune"] = finetune
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert message in str(e.value)
