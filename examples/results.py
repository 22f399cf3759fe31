"""Write docs/results.md from the runs of the three example studies (a page of numbers from
MLflow, not typed by hand).

    python examples/results.py role_of_data=sqlite:///runs/role_of_data/mlflow.db \\
        limits=sqlite:///runs/limits/mlflow.db data_based=sqlite:///runs/data_based/mlflow.db \\
        --out docs/results.md

Each STUDY=TRACKING_URI names where a study's runs are (the follow-up study of data_based,
data_based-counterfactual, is read from the same store). For each study it runs
`transferlab report` into docs/results/STUDY/ (figures, tables/*.csv, numbers.json; the
self-contained report.html is left out of the repository), reads the study's wall time from its
MLflow study runs, and evaluates every claim of orchestrator.analysis.claims.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.analysis import claims
from orchestrator.analysis.counterfactual import read_plan
from orchestrator.analysis.datamodels import datamodel_inputs
from orchestrator.analysis.frame import load_study
from orchestrator.analysis.report import build_report, write_report
from orchestrator.tracking import KIND_STUDY, Tracker

PLANTED = "handwritten-7"  # builtin:glyphs-planted's duplicate of the digits task's class 7
FIGURES = {  # report figures shown on the page, per study (others stay in docs/results/STUDY/figures)
    "role_of_data": ["accuracy_vs_shots_digits", "accuracy_vs_shots_letters", "spread_vs_shots",
                     "accuracy_vs_size_digits_mnist", "accuracy_vs_size_letters_glyphs"],
    "limits": ["downstream_vs_upstream_letters_linear_probe", "downstream_vs_upstream_digits_linear_probe", "e_ir_vs_shots"],
    "data_based": ["influence_digits_linear_probe_glyphs", "influence_convergence", "counterfactual"],
}


def _fmt(v: float) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:+.3f}"


def claim_table(title: str, rows: pd.DataFrame) -> str:
    out = [f"**{title}** — verdict: **{claims.summary(rows)}**", "",
           "| setting | statistic | estimate | 95% CI | n | verdict |", "|---|---|---|---|---|---|"]
    for r in rows.itertuples():
        ci = "—" if not np.isfinite(r.ci_low) else f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        out.append(f"| {r.setting} | {r.statistic} | {_fmt(r.estimate)} | {ci} | {r.n} | {r.verdict} |")
    return "\n".join(out) + "\n"


def wall_time(tracker: Tracker, study: str) -> str:
    exp = tracker.client.get_experiment_by_name(study)
    runs = [r for r in tracker.runs(exp.experiment_id, KIND_STUDY) if r.info.end_time] if exp else []
    if not runs:
        return "not recorded"
    seconds = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    return f"{seconds / 60:.1f} min over {len(runs)} `run` invocation(s)"


def report_into(tracker: Tracker, study: str, out: Path) -> list[str]:
    """Write the study's report under ``out``; returns the figure names it made."""
    rep = build_report(tracker, study)
    write_report(rep, out)
    (out / "report.html").unlink(missing_ok=True)  # self-contained copies of the figures: not for the repo
    return sorted(p.stem for p in (out / "figures").glob("*.png"))


def figures_md(study: str, made: list[str]) -> str:
    shown = [f for f in FIGURES.get(study, []) if f in made] or made[:4]
    return "\n".join(f"![{f}](results/{study}/figures/{f}.png)" for f in shown) + "\n"


def role_of_data(tracker: Tracker) -> str:
    t = load_study(tracker, "role_of_data").transfer
    return "\n".join([
        claim_table("1. The spread between sources is large at few shots and shrinks with full data", claims.source_spread(t)),
        claim_table("2. More pretraining data helps few-shot transfer more than full-data transfer", claims.size_helps_few_shot_more(t)),
        claim_table("3. A larger noisy pretraining set vs a smaller clean one (supervised)", claims.noisy_larger_vs_clean_smaller(t[t["method"] == "supervised"])),
    ])


def limits(tracker: Tracker) -> str:
    t = load_study(tracker, "limits").transfer
    sat = claims.saturation_claims(t)
    parts = [claim_table(f"{i}. {name}", sat[sat["claim"] == name]) for i, name in enumerate(dict.fromkeys(sat["claim"]), 1)]
    parts.append(claim_table(f"{len(parts) + 1}. The best layer depends on the task (final for near, earlier for far)",
                             claims.layer_claims(t, near="letters", far="digits")))
    return "\n".join(parts)


def data_based(tracker: Tracker) -> str:
    sr = load_study(tracker, "data_based")
    parts = []
    for x in datamodel_inputs(tracker, sr.experiment_id):
        parts.append(claim_table(f"1. The planted duplicate class ranks most helpful ({x.masks.shape[0]} models, task {x.task})",
                                 claims.planted_class_rank(x.classes, x.masks, x.outputs, PLANTED)))
    plan = read_plan(tracker, sr.study_run_id)
    if plan is None:
        parts.append("No counterfactual follow-up recorded yet (`transferlab counterfactual` logs its plan on the study run).\n")
    else:
        follow = load_study(tracker, plan["followup_study"]).transfer
        parts.append(claim_table("2. Removing the most harmful classes helps, removing the most helpful hurts", claims.counterfactual_claims(None, follow, plan)))
    return "\n".join(parts)


SECTIONS = {
    "role_of_data": ("Entezari et al. 2023 — the role of pretraining data", role_of_data),
    "limits": ("Abnar et al. 2021 — the limits of large-scale pretraining", limits),
    "data_based": ("Jain et al. 2022 — a data-based perspective on transfer", data_based),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", metavar="STUDY=TRACKING_URI")
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    stores = dict(s.split("=", 1) for s in args.stores)
    bad = [s for s in stores if s not in SECTIONS]
    if bad:
        p.error(f"unknown study {bad[0]!r}; known: {', '.join(SECTIONS)}")
    body = []
    for study, uri in stores.items():
        title, claims_of = SECTIONS[study]
        tracker = Tracker(uri)
        folder = out.parent / "results" / study
        shutil.rmtree(folder, ignore_errors=True)
        made = report_into(tracker, study, folder)
        print(f"{study}: report in {folder}", file=sys.stderr)
        body.append(f"## {title}\n\n`examples/{study}.yaml`; wall time on this machine: {wall_time(tracker, study)}.\n\n"
                    f"{figures_md(study, made)}\n{claims_of(tracker)}")
    out.write_text("\n".join(body))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
