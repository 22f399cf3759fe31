"""``transferlab report``: a study's MLflow runs ► tables, fits, figures ► one self-contained HTML.

Output folder: ``report.html`` (figures embedded as base64 PNG, no external resources),
``tables/NAME.csv`` for every table, ``figures/NAME.png`` for every figure and ``numbers.json``
with the fitted numbers. :func:`log_report` copies the folder onto the study run under
``report/``. What each table and figure means: docs/analysis.md.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.analysis import claims as claims_
from orchestrator.analysis import counterfactual as cf
from orchestrator.analysis import figures, influence, tables
from orchestrator.analysis.datamodel_influence import datamodel_inputs, influence_output
from orchestrator.analysis.frame import StudyRuns, influence_inputs, load_study
from orchestrator.analysis.memo import Memo
from orchestrator.records.schema import REPORT_ARTIFACT_DIR, SPEC_ARTIFACT
from orchestrator.records.tracker import Tracker
from orchestrator.spec import SpecError, StudySpec, load_spec

SHOWN_ROWS = 25  # rows of a table shown in the HTML; the CSV has all of them


@dataclass
class Section:
    title: str
    text: str
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (kind: figure|table, name, caption)


@dataclass
class Report:
    study: str
    study_run_id: str | None
    status_line: str
    partial: bool
    sections: list[Section] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)
    # Slow pure results (figures, bootstrapped fits) kept by input digest; Memo(None) keeps none.
    memo: Memo = field(default_factory=lambda: Memo(None), repr=False, compare=False)

    def section(self, title: str, text: str) -> Section:
        self.sections.append(Section(title, text))
        return self.sections[-1]

    def table(self, sec: Section, name: str, df: pd.DataFrame, caption: str, show: bool = True) -> None:
        """Every table becomes a CSV; non-empty ones with ``show`` also appear in the HTML."""
        self.tables[name] = df
        if show and len(df):
            sec.items.append(("table", name, caption))
        elif len(df):
            sec.items.append(("csv", name, caption))

    def figure(self, sec: Section, name: str, png: bytes, caption: str) -> None:
        self.figures[name] = png
        sec.items.append(("figure", name, caption))


def _records(df: pd.DataFrame) -> list[dict]:
    """JSON-safe rows (NaN → null)."""
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in json.loads(df.to_json(orient="records"))
    ]


# ---------------------------------------------------------------------------------------------
# The three papers' analyses


def _entezari(rep: Report, t: pd.DataFrame, n_boot: int, seed: int) -> None:
    sec = rep.section(
        "Pretraining data: sources, sizes, noise (Entezari et al.)",
        "Each curve is one pretraining source and method at its largest size and lowest label noise unless "
        "the axis varies it. Points are means over seeds (pretraining × few-shot draws) with 95% CIs.",
    )
    shots = tables.shots_curves(t)
    rep.table(sec, "accuracy_vs_shots", shots, "Accuracy vs shots per curve (few-shot settings).")
    for task, g in shots.groupby("task"):
        rep.figure(
            sec,
            f"accuracy_vs_shots_{task}",
            rep.memo(
                figures.curves,
                g,
                "shots_n",
                tables.series_keys(t) + ["protocol"],
                f"{task}: accuracy vs shots",
                "shots per class (log)",
            ),
            f"Task {task}: accuracy vs shots, one curve per source/method.",
        )
    sizes = tables.size_curves(t)
    rep.table(sec, "accuracy_vs_size", sizes, "Accuracy vs pretraining size (samples) per curve and shots.")
    for (task, source), g in sizes.groupby(["task", "source"]):
        if g[tables.SIZE].nunique() >= 2:
            rep.figure(
                sec,
                f"accuracy_vs_size_{task}_{source}",
                rep.memo(
                    figures.curves,
                    g,
                    tables.SIZE,
                    ["shots", "method"],
                    f"{task} ← {source}: accuracy vs pretraining size",
                    "pretraining samples (log)",
                ),
                f"Task {task}, source {source}: one curve per shots setting.",
            )
    spread = tables.spread_table(shots)
    rep.table(sec, "spread_across_sources", spread, "Spread of the curves' mean accuracy across sources, per shots.")
    if (spread["sources"] > 1).any():
        rep.figure(
            sec,
            "spread_vs_shots",
            rep.memo(figures.spread, spread, "Spread across sources vs shots"),
            "Does the choice of source matter less with more shots?",
        )
    iso = tables.iso_accuracy_table(t)
    rep.table(
        sec,
        "label_noise_iso_accuracy",
        iso,
        "How many noisy samples equal n clean ones (interpolated in log size; "
        "empty cells: the noisy curve never reaches that accuracy).",
    )
    mult = tables.multiplier_table(t, n_boot=n_boot, seed=seed, memo=rep.memo)
    rep.table(
        sec,
        "data_multiplier",
        mult,
        "N× more data of source A to match source B (geometric mean over B's sizes A's "
        "curve reaches; bootstrap 95% CI over seeds).",
    )
    rep.numbers["data_multiplier"] = _records(mult)
    rep.numbers["label_noise_iso_accuracy"] = _records(iso)


def _abnar(rep: Report, t: pd.DataFrame, n_boot: int, seed: int) -> None:
    sec = rep.section(
        "Upstream vs downstream accuracy (Abnar et al.)",
        "One point per pretraining run (mean over few-shot draws). The fit e_DS = k·e_US^α + e_IR (e = 1 − accuracy) "
        "is made on the upper convex hull (the best downstream accuracy reached for each upstream accuracy) and on "
        "all points; CIs are bootstrap 95% intervals. The held-out check fits on the lowest 80% of upstream "
        "accuracies and scores RMSE of e_DS on the Pareto front (best runs) of the top 20%.",
    )
    points = tables.us_ds_points(tables.final_layer(t))
    rep.table(sec, "downstream_vs_upstream", points, "The scatter's points.", show=False)
    fitted, check = tables.saturation_tables(points, n_boot=n_boot, seed=seed, memo=rep.memo)
    rep.table(sec, "saturation_fits", fitted, "Fitted k, α, e_IR with bootstrap 95% CIs, per task and shots.")
    rep.table(
        sec,
        "heldout_check",
        check,
        "Held-out check: RMSE of predicted downstream error on the top-20% upstream frontier.",
    )
    for (task, protocol), g in points.groupby(["task", "protocol"]):
        f = fitted[(fitted["task"] == task) & (fitted["protocol"] == protocol)]
        rep.figure(
            sec,
            f"downstream_vs_upstream_{task}_{protocol}",
            rep.memo(figures.saturation_panel, g, f, f"{task} ({protocol})", seed=seed),
            f"Task {task}: downstream vs upstream accuracy with the hull and both fits.",
        )
    if len(fitted) and np.isfinite(fitted["shots_n"]).any():
        rep.figure(
            sec,
            "e_ir_vs_shots",
            rep.memo(figures.e_ir_vs_shots, fitted, "Irreducible downstream error vs shots"),
            "e_IR of each fit vs shots.",
        )
    layers = tables.best_layer_table(t)
    if len(layers):
        rep.table(
            sec, "best_layer", layers, "Mean accuracy per representation layer; best = highest per task and shots."
        )
    rep.numbers["saturation_fits"] = _records(fitted)
    rep.numbers["heldout_check"] = _records(check)
    rep.numbers["best_layer"] = _records(layers[layers["best"]]) if len(layers) else []


def _jain(
    rep: Report, tracker: Tracker, sr: StudyRuns, seed: int, datamodels: list | None = None, cached: bool = False
) -> tuple[list, pd.DataFrame | None]:
    """The influence section; returns the influence inputs and the follow-up's arm runs (the
    claims' evidence)."""
    t = sr.transfer
    inputs = (
        [
            x
            for task, protocol, source in t.groupby(["task", "protocol", "source"]).size().index
            if (x := influence_inputs(sr, task, protocol, source=source)) is not None
        ]
        if len(t)
        else []
    )
    inputs += datamodels or []  # datamodel sweeps: masks and outputs from their table
    if not inputs:
        return [], None
    sec = rep.section(
        "Source-class influence (Jain et al.)",
        "Influence of a source class = mean per-example output of models that trained on it minus that of "
        "models that did not (Welch standard error); the output is "
        + "; ".join(sorted({f"{x.output_words} for {x.task}/{x.protocol}" for x in inputs}))
        + ". Positive helps the target task, negative harms it.",
    )
    ranks, reliabilities, per_example, found = [], [], [], []
    for x in inputs:
        task_inf = influence.task_influence(x.masks, x.outputs)
        r = influence.ranking(x.classes, task_inf).assign(
            task=x.task, protocol=x.protocol, source=x.source, shots=x.shots, models=len(x.masks)
        )
        ranks.append(r)
        c = influence.split_half_reliability(x.masks, x.outputs, seed=seed).assign(
            task=x.task, protocol=x.protocol, source=x.source
        )
        reliabilities.append(c)
        ex = influence.influence(x.masks, x.outputs)
        per_example.append(
            pd.DataFrame(
                {
                    "task": x.task,
                    "protocol": x.protocol,
                    "source": x.source,
                    "class": np.repeat(np.asarray(x.classes, dtype=object), len(x.examples)),
                    "example": np.tile(x.examples, len(x.classes)),
                    "influence": ex.values.ravel(),
                    "se": ex.se.ravel(),
                }
            )
        )
        perm = influence.permutation_test(x.masks, x.outputs, influence.PERMUTATIONS, seed).per_example(
            x.classes, x.examples
        )
        found.append(
            perm[perm["p_family"] < influence.FAMILY_ALPHA].assign(task=x.task, protocol=x.protocol, source=x.source)
        )
        rep.figure(
            sec,
            f"influence_{x.task}_{x.protocol}_{x.source}",
            rep.memo(
                figures.influence_bars,
                r,
                f"{x.task} ({x.protocol}, {x.shots} shots): most helpful and harmful classes of {x.source}",
                output=x.output_words,
            ),
            f"Task {x.task}, source {x.source}: ranked class influence.",
        )
        rep.numbers.setdefault("influence", {})[f"{x.task}/{x.protocol}/{x.source}"] = {
            "shots": x.shots,
            "models": len(x.masks),
            "output": x.output,
            "most_helpful": _records(r.head(5)[["class", "influence", "se"]]),
            "most_harmful": _records(r.iloc[::-1].head(5)[["class", "influence", "se"]]),
        }
    rank_df, reliability_df = pd.concat(ranks, ignore_index=True), pd.concat(reliabilities, ignore_index=True)
    rep.table(sec, "class_ranking", rank_df, "Source classes from most helpful to most harmful, per task.")
    rep.table(
        sec,
        "influence_reliability",
        reliability_df,
        "Split-half reliability of the class ranking: the correlation of the class influences from two "
        "disjoint random halves of the models, Spearman–Brown corrected (mean and 2.5–97.5% range over "
        "splits). About 0 when no class matters; near 1 when the ranking is stable.",
    )
    rep.tables["influence_per_example"] = pd.concat(per_example, ignore_index=True)
    rep.table(
        sec,
        "influence_found_examples",
        pd.concat(found, ignore_index=True).sort_values(["task", "p_family", "class"], kind="stable"),
        f"(class, example) pairs whose influence is significant family-wise (p_family < {influence.FAMILY_ALPHA:g}: a "
        f"mask-permutation test, {influence.PERMUTATIONS} permutations, max-|z| over every pair tested, so in at most "
        f"{influence.FAMILY_ALPHA:g} of studies where no class matters would any pair appear here).",
    )
    return inputs, _counterfactual(rep, tracker, sr, sec, cached)


def _counterfactual(
    rep: Report, tracker: Tracker, sr: StudyRuns, sec: Section, cached: bool = False
) -> pd.DataFrame | None:
    """The follow-up's accuracy vs K; returns its runs per arm (:func:`cf.arm_runs`), None without one."""
    plan = cf.read_plan(tracker, sr.study_run_id)
    if plan is None:
        return None
    try:
        follow = load_study(tracker, plan["followup_study"], cached=cached)
    except ValueError:
        sec.text += f" Counterfactual follow-up '{plan['followup_study']}' is planned but has no runs yet."
        return None
    agg = cf.arm_accuracy(follow.transfer, plan)
    rep.table(
        sec, "counterfactual", agg, f"Follow-up study {plan['followup_study']}: target accuracy vs K removed classes."
    )
    if len(agg):
        note = " (partial)" if follow.partial else ""
        rep.figure(
            sec,
            "counterfactual",
            rep.memo(figures.counterfactual_plot, agg, f"{plan['task']}: accuracy after removing K classes{note}"),
            "Removing harmful classes should help, removing helpful ones hurt, random in between.",
        )
    rep.numbers["counterfactual"] = {
        "followup_study": plan["followup_study"],
        "partial": follow.partial,
        "arms": _records(agg),
    }
    return cf.arm_runs(follow.transfer, plan)


def logged_spec(tracker: Tracker, study_run_id: str | None) -> tuple[StudySpec | None, str]:
    """The study file logged on the study run, or None and why not."""
    if study_run_id is None:
        return None, "no study run"
    with tempfile.TemporaryDirectory(prefix="transferlab-spec-") as tmp:
        try:
            path = tracker.client.download_artifacts(study_run_id, SPEC_ARTIFACT, tmp)
        except Exception:  # no spec logged: MLflow raises a store-specific error
            return None, "no study file logged"
        try:
            return load_spec(path), ""  # the loader every study file goes through: size limit, strict YAML
        except SpecError as e:
            return None, f"the logged study file does not parse ({e})"


def declared_claims(spec: StudySpec | None, why: str = "") -> tuple[tuple, str]:
    """The ``claims:`` of the logged study file (:func:`logged_spec`), and where they came from;
    ``()`` when it declared none (or no spec was logged, ``why``): the report then judges the defaults."""
    if spec is None:
        return (), f"{why}: the claims that apply to the grid, at their defaults"
    if not spec.claims:
        return (), "the study declares no claims: the claims that apply to the grid, at their defaults"
    return spec.claims, f"the {len(spec.claims)} claims the study file declares"


def _claims(rep: Report, evidence: claims_.Evidence, declared: tuple, origin: str) -> None:
    rows = claims_.evaluate(evidence, declared)
    judged = declared or claims_.default_claims(evidence)
    summary = claims_.overall(rows, judged) if len(rows) else []
    rep.numbers["claims"] = _records(rows)
    rep.numbers["claims_overall"] = summary
    rep.numbers["claims_source"] = origin
    if not len(rows):
        return
    sec = rep.section(
        "Claims",
        f"Judged: {origin}. Each row: a statistic, its 95% interval and a verdict — reproduced (the interval lies "
        "on the predicted side), not reproduced (on the other side), inconclusive (it straddles, or too few units "
        "to judge: fewer than 3 pretraining seeds per configuration, fewer than 5 hull points). n: the units the "
        "interval rests on. How each is computed: docs/analysis.md#claims.",
    )
    rep.table(sec, "claims_overall", pd.DataFrame(summary), "One verdict per claim.")
    rep.table(sec, "claims", rows, "Every claim, per setting.")


def build_report(
    tracker: Tracker, study: str, n_boot: int = 200, seed: int = 0, cached: bool = False, refresh: bool = False
) -> Report:
    """Read the study from MLflow and compute every table, fit and figure (AnalysisError if unknown/empty).

    ``cached``: read runs and artifacts through the local run cache (:mod:`~orchestrator.analysis.run_cache`);
    ``refresh``: rebuild that cache from every run."""
    t0 = time.perf_counter()
    sr = load_study(tracker, study, cached=cached, refresh=refresh)
    rep = Report(study, sr.study_run_id, sr.status_line(), sr.partial)
    rep.memo = Memo(sr.cache.folder if sr.cache else None, refresh=refresh)
    rep.numbers.update(
        {
            "study": study,
            "partial": sr.partial,
            "status": sr.status,
            "finished_transfer_runs": len(sr.transfer),
            "n_boot": n_boot,
            "seed": seed,
        }
    )
    spec, why = logged_spec(tracker, sr.study_run_id)
    dm = datamodel_inputs(tracker, sr.experiment_id, influence_output(spec))
    inputs, arms = [], None
    if sr.transfer.empty and not dm:
        rep.section("No results yet", "No transfer run of this study has finished.")
    elif sr.transfer.empty:
        inputs, arms = _jain(rep, tracker, sr, seed, dm, cached)
    else:
        _entezari(rep, tables.final_layer(sr.transfer), n_boot, seed)
        _abnar(rep, sr.transfer, n_boot, seed)
        inputs, arms = _jain(rep, tracker, sr, seed, dm, cached)
    evidence = claims_.Evidence(sr.transfer, tuple(inputs), arms, seed=seed)
    _claims(rep, evidence, *declared_claims(spec, why))
    rep.numbers["seconds"] = round(time.perf_counter() - t0, 2)
    return rep


# ---------------------------------------------------------------------------------------------
# Output


_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.partial{background:#fff3cd;border:1px solid #e0c36c;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 2px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}figure{margin:14px 0}figcaption,.cap{color:#555;font-size:12px}img{max-width:100%}
.muted{color:#777;font-size:12px}"""

# Records in the page itself whether every embedded image decoded, and when the page finished
# loading: the browser test and the benchmark read these attributes back.
_SCRIPT = """window.addEventListener("load", function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) { if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++; }
  var b = document.body;
  b.setAttribute("data-images", imgs.length);
  b.setAttribute("data-broken-images", broken);
  b.setAttribute("data-load-ms", Math.round(performance.now()));
  document.getElementById("loadinfo").textContent = "Opened in " + Math.round(performance.now()) + " ms; " +
    (imgs.length - broken) + "/" + imgs.length + " figures rendered.";
});"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _table_html(df: pd.DataFrame, name: str) -> str:
    shown = df.head(SHOWN_ROWS)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    more = f" Showing {SHOWN_ROWS} of {len(df)} rows." if len(df) > SHOWN_ROWS else ""
    return (
        f"<table><tr>{head}</tr>{body}</table>"
        f'<div class="muted">{len(df)} rows; <a href="tables/{name}.csv">tables/{name}.csv</a>.{more}</div>'
    )


def render_html(rep: Report) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>transferlab report: "
        f"{html.escape(rep.study)}</title>",
        f"<style>{_CSS}</style></head><body><h1>Study <code>{html.escape(rep.study)}</code></h1>",
        f"<p>{html.escape(rep.status_line)}.</p>",
    ]
    if rep.partial:
        parts.append(
            "<p class='partial'><b>Partial results:</b> some runs of this study are still running or did not finish; "
            "tables and figures use the finished runs only.</p>"
        )
    parts.append(
        "<ul>"
        + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(rep.sections))
        + "</ul>"
    )
    for i, s in enumerate(rep.sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2><p>{html.escape(s.text)}</p>")
        for kind, name, caption in s.items:
            if kind == "figure":
                b64 = base64.b64encode(rep.figures[name]).decode()
                parts.append(
                    f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            elif kind == "csv":
                parts.append(
                    f"<p class='muted'>{html.escape(caption)} {len(rep.tables[name])} rows: "
                    f"<a href='tables/{name}.csv'>tables/{name}.csv</a></p>"
                )
            else:
                parts.append(
                    f"<h3 class='cap'>{html.escape(name)}: "
                    f"{html.escape(caption)}</h3>{_table_html(rep.tables[name], name)}"
                )
    parts.append(
        f"<p class='muted' id='loadinfo'></p><p class='muted'>Computed in {rep.numbers.get('seconds', 0):.1f} s "
        "by transferlab report; fitted numbers in numbers.json.</p>"
    )
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(parts)


def write_report(rep: Report, out_dir: str | Path) -> Path:
    """Write report.html, tables/*.csv, figures/*.png and numbers.json; return the HTML path."""
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, df in rep.tables.items():
        tables.spreadsheet_safe(df).to_csv(out / "tables" / f"{name}.csv", index=False)
    for name, png in rep.figures.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    (out / "numbers.json").write_text(json.dumps(rep.numbers, indent=1, default=str))
    path = out / "report.html"
    path.write_text(render_html(rep))
    return path


def report_files(rep: Report) -> list[str]:
    """The files :func:`write_report` writes for ``rep``, relative to its folder."""
    return [
        "report.html",
        "numbers.json",
        *(f"tables/{name}.csv" for name in rep.tables),
        *(f"figures/{name}.png" for name in rep.figures),
    ]


def log_report(tracker: Tracker, study_run_id: str, out_dir: str | Path) -> None:
    """Copy the report folder onto the study run under ``report/``."""
    tracker.client.log_artifacts(study_run_id, str(out_dir), REPORT_ARTIFACT_DIR)
