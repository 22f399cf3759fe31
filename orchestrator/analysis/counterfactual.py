"""Jain et al.'s counterfactual check: remove the K most harmful (or helpful, or random) source
classes, retrain, re-evaluate — planned as an ordinary follow-up study.

The follow-up study has one source per (arm, K): the original source with the removed classes
added to its ``drop_classes``, plus the unmodified source (arm ``baseline``, K = 0). Every other
setting is the original study's, without the ``class_fraction`` sweep. Of a datamodels study the
follow-up keeps the ``pretrain`` settings (its models train as the datamodels did, now as
ordinary pretraining runs), drops ``datamodels:`` and probes the task as the sweep did: a
``transfer`` section of the sweep's protocol, shots, transfer seed and task. The plan (which
source is which arm and K, and the removed classes) is written next to the YAML and logged on the
original study run as ``counterfactual/plan.json``; ``transferlab report`` reads it to plot
accuracy vs K.

Arms are compared **paired by pretraining seed** (:func:`paired_arm_differences`): every source
of the follow-up trains with the same seeds 0..N-1, so seed s of an arm and seed s of the baseline
share the initialisation and data order and differ only by the removed classes; the per-seed
differences carry none of the seed-to-seed spread that two independent groups would.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from orchestrator.analysis import AnalysisError, stats
from orchestrator.analysis.datamodel_influence import datamodel_inputs
from orchestrator.analysis.fits import aggregate
from orchestrator.analysis.frame import (
    PRETRAIN_SEED,
    InfluenceInputs,
    StudyRuns,
    at_largest_shots,
    influence_inputs,
    load_study,
)
from orchestrator.analysis.influence import ranking, task_influence
from orchestrator.analysis.tables import final_layer
from orchestrator.records.schema import COUNTERFACTUAL_PLAN_ARTIFACT, METRIC_ACCURACY
from orchestrator.records.tracker import Tracker
from orchestrator.spec import COUNTERFACTUAL_ARMS as ARMS
from orchestrator.spec import DataRef, StudySpec, load_spec, parse_spec

BASELINE = "baseline"
# Pretraining seeds of each follow-up source of a datamodels study, unless --seeds says: enough
# pairs for a paired t-interval whose half-width is about half the per-seed spread (t₀.₉₇₅,₁₅ · 1/√16).
SEEDS_PER_ARM = 16
PAIRED_COLUMNS = ["claim", "setting", "statistic", "estimate", "ci_low", "ci_high", "n", "interval", "verdict"]


def removed_classes(ranking: pd.DataFrame, arm: str, k: int, seed: int = 0) -> list[str]:
    """The K classes an arm removes; nested in K (the K=2 set contains the K=1 set).

    ``ranking`` is :func:`orchestrator.analysis.influence.ranking` (most helpful first). Random
    draws one seeded permutation of the ranked classes (sorted by name first, so the draw does
    not depend on the ranking's order).
    """
    ranked = ranking.dropna(subset=["influence"])["class"].astype(str).tolist()
    if arm == "helpful":
        return ranked[:k]
    if arm == "harmful":
        return ranked[::-1][:k]
    if arm == "random":
        names = sorted(ranked)
        return [names[i] for i in np.random.default_rng(seed).permutation(len(names))[:k]]
    raise AnalysisError("--arms", f"unknown arm {arm!r}; choose from: {', '.join(ARMS)}")


def source_name(source: str, arm: str, k: int) -> str:
    return f"{source}-{arm}-k{k}"


def plan_followup(
    spec: StudySpec,
    source: str,
    ranking: pd.DataFrame,
    ks: list[int],
    arms: list[str],
    task: str,
    seed: int = 0,
    name: str | None = None,
    seeds: int | None = None,
) -> tuple[dict, dict]:
    """The follow-up study document (a valid spec) and its plan; AnalysisError on bad K or source.

    ``seeds``: pretraining seeds 0..seeds-1 of every source (default: the study's own seeds;
    :data:`SEEDS_PER_ARM` for a datamodels study, which has none). Every source gets the same
    seeds, so arms pair with the baseline by seed (:func:`paired_arm_differences`).
    """
    if source not in spec.sources:
        raise AnalysisError("--source", f"unknown source {source!r}; the study has: {', '.join(spec.sources)}")
    usable = int(ranking["influence"].notna().sum())
    for k in ks:
        if not 1 <= k < usable:
            raise AnalysisError(
                "--remove-top", f"K must be in 1..{usable - 1} (classes with an influence estimate), got {k}"
            )
    ref = spec.sources[source]
    name = name or f"{spec.study}-counterfactual"
    doc = copy.deepcopy(spec.raw)
    doc["study"] = name
    sources = {source: _entry(ref, list(ref.drop_classes))}
    plan = {
        "study": spec.study,
        "followup_study": name,
        "task": task,
        "seed": seed,
        "sources": {source: {"arm": BASELINE, "k": 0, "removed_classes": []}},
    }
    for arm in arms:
        for k in sorted(ks):
            removed = removed_classes(ranking, arm, k, seed)
            sources[source_name(source, arm, k)] = _entry(ref, list(ref.drop_classes) + removed)
            plan["sources"][source_name(source, arm, k)] = {"arm": arm, "k": k, "removed_classes": removed}
    doc["sources"] = sources
    doc["tasks"] = {t: _entry(r) for t, r in spec.tasks.items()}
    if spec.datamodels is not None:
        _from_datamodels(doc, spec, list(sources), SEEDS_PER_ARM if seeds is None else seeds)
    else:
        pretrain = doc.setdefault("pretrain", {})
        sweep = pretrain.get("sweep") or {}
        for grid in (
            sweep if isinstance(sweep, list) else [sweep]
        ):  # one grid or a list of grids: each gets every source
            grid.pop("class_fraction", None)
            grid["source"] = list(sources)
            if seeds is not None:
                grid["seed"] = list(range(seeds))
        pretrain["sweep"] = sweep
    parse_spec(copy.deepcopy(doc))  # raises SpecError naming the field if the plan is not a valid study
    return doc, plan


def _entry(ref: DataRef, drop: list[str] | None = None) -> dict:
    """A source or task entry of the follow-up: the (resolved) uri and its curation and columns."""
    e = {"uri": ref.uri, **ref.columns}
    if ref.keep_classes is not None:
        e["keep_classes"] = list(ref.keep_classes)
    if ref.caption_matches:
        e["caption_matches"] = ref.caption_matches
    if ref.caption_excludes:
        e["caption_excludes"] = ref.caption_excludes
    if drop:
        e["drop_classes"] = list(drop)
    return e


def _from_datamodels(doc: dict, spec: StudySpec, sources: list[str], seeds: int) -> None:
    """Turn a datamodels study's document into an ordinary one: pretraining runs on the arms'
    sources with the sweep's settings, probed as the sweep probed its models."""
    d = spec.datamodels
    doc.pop("datamodels")
    doc["pretrain"] = {**(doc.get("pretrain") or {}), "sweep": {"source": sources, "seed": list(range(seeds))}}
    doc["transfer"] = {
        "protocol": [d.protocol],
        "shots": [d.shots],
        "seeds": [d.transfer_seed],
        "tasks": [d.task],
        "val_fraction": spec.transfer.val_fraction,
    }
    # A trial budget counted the sweep's batched trials; the follow-up's runs are another count.
    budget = {k: v for k, v in (doc.get("budget") or {}).items() if k != "max_trials"}
    doc.pop("budget", None)
    if budget:
        doc["budget"] = budget


def write_followup(doc: dict, plan: dict, out_dir: str | Path) -> Path:
    """Write ``STUDY.yaml`` and ``STUDY.plan.json`` into ``out_dir``; the YAML is loaded back as a check."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['study']}.yaml"
    header = (
        f"# Counterfactual follow-up of study '{plan['study']}' (transferlab counterfactual): each source drops the K\n"
        f"# most harmful / most helpful / random classes by influence on task '{plan['task']}'. Run it with\n"
        f"#   transferlab run {path.name}\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    load_spec(path)
    (out / f"{doc['study']}.plan.json").write_text(json.dumps(plan, indent=1))
    return path


def log_plan(tracker: Tracker, study_run_id: str, plan: dict) -> None:
    tracker.client.log_dict(study_run_id, plan, COUNTERFACTUAL_PLAN_ARTIFACT)


def read_plan(tracker: Tracker, study_run_id: str | None) -> dict | None:
    """The plan logged on a study run, or None."""
    if study_run_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="transferlab-plan-") as tmp:
        try:
            return json.loads(
                Path(tracker.client.download_artifacts(study_run_id, COUNTERFACTUAL_PLAN_ARTIFACT, tmp)).read_text()
            )
        except Exception:  # no plan logged: MLflow raises a store-specific error
            return None


def arm_accuracy(followup_transfer: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """Target accuracy per (arm, K), mean ± 95% CI over seeds; K = 0 (baseline) joins every arm."""
    t = followup_transfer[
        (followup_transfer["task"] == plan["task"]) & (followup_transfer["source"].isin(plan["sources"]))
    ]
    if t.empty:
        return pd.DataFrame(columns=["arm", "k", "mean", "ci", "n"])
    # Compare like with like: the original study's largest shots setting ('full' if present).
    t = at_largest_shots(t)
    shots = t["shots"].iloc[0]
    rows = []
    arms = sorted({v["arm"] for v in plan["sources"].values()} - {BASELINE})
    for src, info in plan["sources"].items():
        for arm in arms if info["arm"] == BASELINE else [info["arm"]]:
            rows.append(t[t["source"] == src].assign(arm=arm, k=info["k"]))
    agg = aggregate(pd.concat(rows), ["arm", "k"], METRIC_ACCURACY)
    agg["shots"] = shots
    return agg


def arm_runs(followup_transfer: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """One row per retrained model of the follow-up: ``arm, k, seed`` (pretraining seed) and its
    target ``accuracy`` (final layer, largest shots setting, mean over few-shot draws); the
    baseline is arm ``baseline``, K = 0. The input of :func:`paired_arm_differences`."""
    t = followup_transfer[
        (followup_transfer["task"] == plan["task"]) & (followup_transfer["source"].isin(plan["sources"]))
    ]
    if t.empty:
        return pd.DataFrame(columns=["arm", "k", "seed", METRIC_ACCURACY])
    t = at_largest_shots(final_layer(t))
    info = pd.DataFrame([{"source": s, "arm": v["arm"], "k": v["k"]} for s, v in plan["sources"].items()])
    per_model = t.merge(info, on="source").groupby(["arm", "k", PRETRAIN_SEED], as_index=False)[METRIC_ACCURACY]
    return per_model.mean().rename(columns={PRETRAIN_SEED: "seed"})


def paired_arm_differences(arm_frame: pd.DataFrame) -> pd.DataFrame:
    """Each removal arm against the baseline and against random removal of as many classes, paired by seed.

    ``arm_frame``: :func:`arm_runs` (columns ``arm, k, seed, accuracy``). For harmful and helpful
    removal at each K, the estimate is the mean over seeds of acc(arm, K, seed) − acc(other,
    seed), where other is the baseline (all classes) or random removal at the same K; only seeds
    both have count (:func:`paired_differences`). The interval is Student's 95% t on those
    differences (n − 1 degrees of freedom). Verdicts, for the sign Jain et al. predict (harmful
    removal raises accuracy, helpful removal lowers it): reproduced (interval on that side of 0),
    not reproduced (on the other), inconclusive (contains 0), or too few to judge (fewer than
    :data:`~orchestrator.analysis.stats.MIN_UNITS` pairs: estimate, no interval). Columns:
    :data:`PAIRED_COLUMNS`. The ``counterfactual_removal`` claim kind judges the same differences.
    """
    rows = []
    for arm, expect in (("harmful", +1), ("helpful", -1)):
        claim = f"removing the most {arm} classes {'raises' if expect > 0 else 'lowers'} target accuracy"
        for k in planned_ks(arm_frame, arm):
            for versus in (BASELINE, "random"):
                diff = paired_differences(arm_frame, arm, k, versus)
                if diff is None:
                    continue
                iv = paired_interval(diff)
                rows.append(
                    {
                        "claim": claim,
                        "setting": versus_setting(k, versus),
                        "statistic": paired_statistic(arm, k, versus),
                        "estimate": iv.estimate,
                        "ci_low": iv.ci_low,
                        "ci_high": iv.ci_high,
                        "n": iv.n,
                        "interval": iv.method,
                        "verdict": stats.verdict(iv, expect),
                    }
                )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def planned_ks(arm_frame: pd.DataFrame, arm: str) -> list[int]:
    """The K values ``arm`` has runs at, in order."""
    return sorted(int(k) for k in arm_frame.loc[arm_frame["arm"] == arm, "k"].unique())


def paired_differences(arm_frame: pd.DataFrame, arm: str, k: int, versus: str) -> np.ndarray | None:
    """Per pretraining seed: acc(``arm`` at K) − acc(baseline) (``versus`` 'baseline') or − acc(random
    at K) ('random'), over the seeds both have; None when either has no runs."""
    acc = arm_frame.set_index(["arm", "k", "seed"])[METRIC_ACCURACY]
    series = {key: g.droplevel([0, 1]) for key, g in acc.groupby(level=["arm", "k"])}
    mine, other = series.get((arm, k)), series.get((BASELINE, 0) if versus == BASELINE else ("random", k))
    if mine is None or other is None:
        return None
    return (mine - other).dropna().to_numpy(float)


def paired_interval(d: np.ndarray) -> stats.Interval:
    """The mean of per-seed differences with its Student-t interval (too few below MIN_UNITS pairs)."""
    iv = stats.t_interval(d)
    return iv if not iv.judged else stats.Interval(iv.estimate, iv.ci_low, iv.ci_high, iv.n, "t (paired by seed)")


def versus_setting(k: int, versus: str) -> str:
    return f"K={k}, vs {'all classes' if versus == BASELINE else 'random K'}"


def paired_statistic(arm: str, k: int, versus: str) -> str:
    other = BASELINE if versus == BASELINE else f"without random {k}"
    return f"acc(without {arm} {k}) − acc({other}), mean of per-seed differences"


def plan_counterfactual(
    tracker: Tracker,
    spec: StudySpec,
    ks: list[int],
    arms: list[str] = ARMS,
    task: str | None = None,
    source: str | None = None,
    seed: int = 0,
    seeds: int | None = None,
    name: str | None = None,
    out: str | Path = ".",
) -> tuple[Path, dict]:
    """Rank the source classes of ``spec``'s finished study by their influence on ``task``,
    write the follow-up study that removes the top ``ks`` of each arm into ``out``, and log its
    plan on the study run. Returns (follow-up YAML path, plan); AnalysisError on bad input."""
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise AnalysisError("--arms", f"unknown arm {bad[0]!r}; choose from: {', '.join(ARMS)}")
    if seeds is not None and seeds < 1:
        raise AnalysisError("--seeds", f"must be >= 1, got {seeds}")
    sr = load_study(tracker, spec.study)
    if spec.datamodels is not None:
        inputs = _datamodel_influence(spec, sr, tracker, task, source)
    else:
        inputs = _class_subset_influence(spec, sr, task, source)
    rank = ranking(inputs.classes, task_influence(inputs.masks, inputs.outputs))
    doc, plan = plan_followup(spec, inputs.source, rank, ks, list(arms), inputs.task, seed=seed, name=name, seeds=seeds)
    # Where the ranking's outputs came from: on the test split, the follow-up is scored on the examples
    # that chose its arms (an analysis can refuse or flag such a plan).
    plan["influence_split"] = inputs.split
    path = write_followup(doc, plan, out)
    if sr.study_run_id:
        log_plan(tracker, sr.study_run_id, plan)
    return path, plan


def arm_lines(plan: dict) -> list[str]:
    """One line per follow-up source of an arm: which classes it drops."""
    return [
        f"{info['arm']:>8} K={info['k']}: drop {', '.join(info['removed_classes'])}  (source {src})"
        for src, info in plan["sources"].items()
        if info["arm"] != BASELINE
    ]


def _class_subset_influence(spec: StudySpec, sr: StudyRuns, task: str | None, source: str | None) -> InfluenceInputs:
    """Influence inputs from the class-subset pretraining runs of ``source`` on ``task``."""
    sources = list(spec.pretrain.sweep["source"])
    source = source or (sources[0] if len(sources) == 1 else None)
    if source is None:
        raise AnalysisError("--source", f"the study has several sources ({', '.join(sources)}); name one")
    tasks = [task] if task else list(dict.fromkeys(sr.transfer["task"]))
    inputs = next(
        (
            x
            for t in tasks
            for protocol in sorted(set(sr.transfer["protocol"]))
            if (x := influence_inputs(sr, t, protocol, source=source)) is not None
        ),
        None,
    )
    if inputs is None:
        raise AnalysisError(
            "study",
            f"'{spec.study}' has no class-subset runs with per-example outputs"
            + (f" on task '{task}'" if task else "")
            + " to estimate influence from",
        )
    return inputs


def _datamodel_influence(
    spec: StudySpec, sr: StudyRuns, tracker: Tracker, task: str | None, source: str | None
) -> InfluenceInputs:
    """Influence inputs from the table of the spec's datamodel sweep (the latest such sweep of the study)."""
    d = spec.datamodels
    for flag, given, own in (("--task", task, d.task), ("--source", source, d.source)):
        if given is not None and given != own:
            raise AnalysisError(
                flag, f"the datamodel sweep of study '{spec.study}' has {flag[2:]} '{own}', not '{given}'"
            )
    found = [
        x
        for x in datamodel_inputs(tracker, sr.experiment_id, d.influence_on)
        if (x.task, x.source, x.protocol, x.shots) == (d.task, d.source, d.protocol, str(d.shots))
    ]
    if not found:
        raise AnalysisError(
            "study",
            f"'{spec.study}' has no datamodel sweep of '{d.source}' probed on '{d.task}' with "
            "at least 2 finished models; run the study first",
        )
    return found[-1]
