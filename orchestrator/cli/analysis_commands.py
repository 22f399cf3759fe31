"""``runs``, ``report`` and ``counterfactual``: a study's MLflow runs read back and analysed."""

from __future__ import annotations

import json
import os

from orchestrator.analysis import AnalysisError, report_cache, sqlite_state
from orchestrator.cli.exits import EXIT_OK, error
from orchestrator.records.tracker import Tracker, resolve_tracking_uri

# The analysis modules (SciPy, matplotlib, the claims) are imported by the command that uses
# them: a report served whole from report_cache needs none of them.


def _tracker(args) -> Tracker:
    try:
        return Tracker(resolve_tracking_uri(args.tracking_uri))
    except ValueError as e:
        raise AnalysisError("--tracking-uri", str(e)) from None


def run(args) -> int:
    """``runs``, ``report`` or ``counterfactual``; bad input is one ``error:`` line."""
    if args.command == "report" and _serve_kept_without_mlflow(args):
        return EXIT_OK
    commands = {"runs": _runs, "report": _report, "counterfactual": _counterfactual}
    try:
        return commands[args.command](args, _tracker(args))
    except AnalysisError as e:
        return error(str(e))


def _serve_kept_without_mlflow(args) -> bool:
    """Serve the kept report of an unchanged study on an sqlite store, asking the database with
    sqlite3 (report_cache.kept_report_fast): MLflow is not imported. False: go the whole way."""
    if args.no_cache or args.refresh or args.bootstrap < 0:
        return False
    uri = sqlite_state.tracking_uri(args.tracking_uri)
    kept = report_cache.kept_report_fast(uri, args.study, args.bootstrap, args.seed) if uri else None
    if kept is None or (kept.study_run_id and not args.no_log and kept.logged_on != kept.study_run_id):
        return False  # not kept, changed, or the kept report must still be logged on its study run
    out = args.out or os.path.join("reports", args.study)
    path = report_cache.restore(kept, out)
    if path is None:
        return False
    logged = bool(kept.study_run_id) and not args.no_log
    _print_report(args, kept.status_line, kept.partial, path, kept.figures, kept.tables, logged, kept=True)
    if args.json:
        print(report_cache.numbers_text(kept))
    return True


def _runs(args, tracker: Tracker) -> int:
    from orchestrator.analysis.tables import spreadsheet_safe
    from orchestrator.records.results import results_table, transfer_frame

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
    out = args.out or os.path.join("reports", args.study)
    keeping = not args.no_cache
    kept = (
        report_cache.kept_report(tracker, args.study, args.bootstrap, args.seed)
        if keeping and not args.refresh
        else None
    )
    path = report_cache.restore(kept, out) if kept else None
    if kept and path:
        logged = bool(kept.study_run_id) and not args.no_log
        if logged and kept.logged_on != kept.study_run_id:
            from orchestrator.analysis.report import log_report

            log_report(tracker, kept.study_run_id, out)
            report_cache.mark_logged(kept, kept.study_run_id)
        _print_report(args, kept.status_line, kept.partial, path, kept.figures, kept.tables, logged, kept=True)
        if args.json:
            print(report_cache.numbers_text(kept))
        return EXIT_OK

    from orchestrator.analysis.report import build_report, log_report, report_files, write_report

    started = report_cache.begin(tracker, args.study, args.bootstrap, args.seed) if keeping else None
    rep = build_report(tracker, args.study, n_boot=args.bootstrap, seed=args.seed, cached=keeping, refresh=args.refresh)
    path = write_report(rep, out)
    study_run = rep.study_run_id
    logged = bool(study_run) and not args.no_log
    if logged:
        log_report(tracker, study_run, out)
    if started:
        summary = {
            "study_run_id": study_run,
            "status_line": rep.status_line,
            "partial": rep.partial,
            "figures": len(rep.figures),
            "tables": len(rep.tables),
            "logged_on": study_run if logged else None,
        }
        report_cache.keep(tracker, args.study, started, out, report_files(rep), summary)
    _print_report(args, rep.status_line, rep.partial, path, len(rep.figures), len(rep.tables), logged, kept=False)
    if args.json:
        print(json.dumps(rep.numbers, indent=1, default=str))
    return EXIT_OK


def _print_report(args, status_line, partial, path, figures, tables, logged, kept) -> None:
    if args.json:
        return
    print(f"{status_line}{' (partial results)' if partial else ''}")
    print(
        f"report: {path} ({figures} figures, {tables} tables as CSV)"
        + ("; logged on the study run under report/" if logged else "")
        + ("; nothing changed since the last report: kept copy, not recomputed" if kept else "")
    )


def _counterfactual(args, tracker: Tracker) -> int:
    from orchestrator.analysis.counterfactual import arm_lines, plan_counterfactual
    from orchestrator.spec import load_spec

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
