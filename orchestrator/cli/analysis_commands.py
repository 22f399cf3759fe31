"""``runs``, ``report`` and ``counterfactual``: a study's MLflow runs read back and analysed."""

from __future__ import annotations

import json
import os

from orchestrator.analysis import AnalysisError
from orchestrator.analysis.counterfactual import arm_lines, plan_counterfactual
from orchestrator.analysis.report import build_report, log_report, write_report
from orchestrator.analysis.tables import spreadsheet_safe
from orchestrator.cli.exits import EXIT_OK, error
from orchestrator.records.results import results_table, transfer_frame
from orchestrator.records.tracker import Tracker, resolve_tracking_uri
from orchestrator.spec import load_spec


def _tracker(args) -> Tracker:
    try:
        return Tracker(resolve_tracking_uri(args.tracking_uri))
    except ValueError as e:
        raise AnalysisError("--tracking-uri", str(e)) from None


def run(args) -> int:
    """``runs``, ``report`` or ``counterfactual``; bad input is one ``error:`` line."""
    commands = {"runs": _runs, "report": _report, "counterfactual": _counterfactual}
    try:
        return commands[args.command](args, _tracker(args))
    except AnalysisError as e:
        return error(str(e))


def _runs(args, tracker: Tracker) -> int:
    if tracker.experiment_id(args.study, create=False) is None:
        raise AnalysisError("study", f"no study named '{args.study}' in {tracker.uri}")
    frame = transfer_frame(tracker, args.study)
    if args.csv:
        print(spreadsheet_safe(frame).to_csv(index=False), end="")
    elif args.json:
        print(frame.to_json(orient="records", indent=1))
    else:
        print(results_table(frame))
    return EXIT_OK


def _report(args, tracker: Tracker) -> int:
    if args.bootstrap < 0:
        raise AnalysisError("--bootstrap", f"must be >= 0, got {args.bootstrap}")
    rep = build_report(
        tracker, args.study, n_boot=args.bootstrap, seed=args.seed, cached=not args.no_cache, refresh=args.refresh
    )
    out = args.out or os.path.join("reports", args.study)
    path = write_report(rep, out)
    study_run = rep.study_run_id
    logged = bool(study_run) and not args.no_log
    if logged:
        log_report(tracker, study_run, out)
    if args.json:
        print(json.dumps(rep.numbers, indent=1, default=str))
    else:
        print(f"{rep.status_line}{' (partial results)' if rep.partial else ''}")
        print(
            f"report: {path} ({len(rep.figures)} figures, {len(rep.tables)} tables as CSV)"
            + ("; logged on the study run under report/" if logged else "")
        )
    return EXIT_OK


def _counterfactual(args, tracker: Tracker) -> int:
    spec = load_spec(args.spec, quick=args.quick)
    if spec.study != args.study:
        raise AnalysisError("--spec", f"is the spec of study '{spec.study}', not '{args.study}'")
    path, plan = plan_counterfactual(
        tracker,
        spec,
        args.remove_top,
        args.arms,
        task=args.task,
        source=args.source,
        seed=args.seed,
        seeds=args.seeds,
        name=args.name,
        out=args.out,
    )
    print("\n".join(arm_lines(plan)))
    print(f"follow-up study: {path}; run it with: transferlab run {path}")
    print(f"then: transferlab report {args.study}  plots target accuracy vs K for each arm")
    return EXIT_OK
