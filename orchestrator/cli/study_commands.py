"""``validate``, ``plan`` and ``run``: a study file in, checked before any compute, then planned
or run; and the counterfactual follow-up a datamodels study asks for."""

from __future__ import annotations

import json
import os
import sys

import yaml

from orchestrator.analysis import AnalysisError
from orchestrator.cli.exits import EXIT_FAILED_RUNS, EXIT_OK, EXIT_STOPPED, command_line, error
from orchestrator.execution.preflight import check_storage, check_tracking
from orchestrator.planning.estimate import check_budget, format_summary, read_state, summarize
from orchestrator.planning.plan import StudyPlan, build_plan
from orchestrator.records.retry import redact
from orchestrator.records.tracker import Tracker, resolve_tracking_uri
from orchestrator.spec import DEFAULT_STORAGE, SpecError, StudySpec, load_spec, resolved_document
from orchestrator.spec.fields import data_uri


def run(args) -> int:
    if args.command == "schema":
        from orchestrator.spec.json_schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    spec = load_spec(args.study_file, args.overrides, quick=args.quick)
    if args.command == "config":  # the document only: no data is opened
        print(yaml.safe_dump(resolved_document(spec), sort_keys=False), end="")
        return EXIT_OK
    plan = build_plan(spec)
    if args.command == "plan":
        return _plan(args, spec, plan)
    if args.command == "validate":
        return _validate(spec, plan)
    tracking_field = "--tracking-uri" if args.tracking_uri else "tracking_uri"
    _check_infrastructure(args.tracking_uri or spec.tracking_uri, None, tracking_field, None)
    if plan.datamodels is not None:
        _datamodels_line(spec)  # its budget check
    else:
        _summary(spec, plan, args.tracking_uri, budget=True, rerun_changed=args.rerun_changed)  # before storage
    _check_infrastructure(
        args.tracking_uri or spec.tracking_uri,
        args.storage_path or spec.storage_path or DEFAULT_STORAGE,
        tracking_field,
        "--storage-path" if args.storage_path else "storage_path",
    )
    return _run(args, spec, plan)


def _validate(spec: StudySpec, plan: StudyPlan) -> int:
    budgeted = spec.budget.max_trials is not None or spec.budget.max_hours is not None
    if spec.tracking_uri or budgeted:  # a budget counts only what MLflow does not hold yet
        _check_infrastructure(spec.tracking_uri, None, "tracking_uri", None)
    if plan.datamodels is not None:
        print(f"ok: {_datamodels_line(spec)}")
        return EXIT_OK
    if budgeted:
        _summary(spec, plan, None, budget=True)
    print(
        f"ok: study '{spec.study}': {len(plan.pretrain_runs)} pretraining runs, "
        f"{plan.num_transfer_fits} transfer fits on {len(spec.transfer_tasks)} task(s)"
    )
    return EXIT_OK


def _datamodels_line(spec: StudySpec) -> str:
    """A datamodels study in one line; refuses one whose trials exceed ``budget.max_trials``."""
    d = spec.datamodels
    trials = -(-d.num_models // d.models_per_trial)
    if spec.budget.max_trials is not None and trials > spec.budget.max_trials:
        raise SpecError(
            "budget.max_trials",
            f"the datamodel sweep needs {trials} trials, {trials - spec.budget.max_trials} over "
            f"the budget of {spec.budget.max_trials}; raise datamodels.models_per_trial or the budget",
        )
    return (
        f"study '{spec.study}': datamodel sweep of {d.num_models} models on {d.class_fraction:g} of the classes "
        f"of '{d.source}', {trials} trials of up to {d.models_per_trial} models, probed on '{d.task}'"
    )


def _summary(spec: StudySpec, plan: StudyPlan, tracking_uri: str | None, budget: bool, rerun_changed: bool = False):
    """The plan summary against MLflow (read only); with ``budget``, refuse a study over it."""
    field = "--tracking-uri" if tracking_uri else "tracking_uri"
    try:
        uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    except ValueError as e:
        raise SpecError(field, str(e)) from None
    summary = summarize(plan, read_state(uri, spec.study), rerun_changed=rerun_changed)
    if budget:
        check_budget(spec, summary)
    return summary, uri


def _plan(args, spec: StudySpec, plan: StudyPlan) -> int:
    if plan.datamodels is not None:
        print(f"{_datamodels_line(spec)}; models already in the sweep's table are skipped when it runs")
        return EXIT_OK
    _check_infrastructure(
        args.tracking_uri or spec.tracking_uri, None, "--tracking-uri" if args.tracking_uri else "tracking_uri", None
    )
    summary, uri = _summary(spec, plan, args.tracking_uri, budget=False, rerun_changed=args.rerun_changed)
    if args.json:
        print(json.dumps({**summary.to_dict(), "tracking_uri": redact(uri)}, indent=1))
    else:
        print(format_summary(summary, spec, redact(uri)))
    check_budget(spec, summary)  # printed first, so the refusal comes with the numbers
    return EXIT_OK


def _check_infrastructure(tracking_uri, storage, tracking_field, storage_field) -> None:
    """The tracking server answers and the storage path takes a write, before any compute."""
    try:
        check_tracking(resolve_tracking_uri(tracking_uri))
    except ValueError as e:
        raise SpecError(tracking_field, str(e)) from None
    if storage is not None:
        data_uri(storage_field, storage)
        try:
            check_storage(storage)
        except ValueError as e:
            raise SpecError(storage_field, redact(str(e))) from None


def stopped(e: Exception, argv: list[str] | None) -> int:
    """The study stopped mid-way (tracking outage past its deadline, storage failure, data it
    could not open): one line saying which, and how to resume."""
    if isinstance(e, FileNotFoundError):
        what = f"no such file or directory: {e.filename or e}"
    elif isinstance(e, OSError):
        what = f"storage failed: {e.strerror or e} ({getattr(e, 'filename', '') or ''})"
    else:
        what = str(e)
    print(
        f"stopped: {redact(what)}. Finished runs are recorded in MLflow and checkpoints kept in storage; "
        f"when the problem is fixed, resume with the same command: {redact(command_line(argv))}",
        file=sys.stderr,
    )
    return EXIT_STOPPED


def _run(args, spec: StudySpec, plan: StudyPlan) -> int:
    from orchestrator.execution.study import run_study  # Ray, torch: only when a study runs

    outcome = run_study(
        spec,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        plan=plan,
        fail_fast=args.fail_fast,
        verbose=args.verbose,
        rerun_changed=args.rerun_changed,
    )
    print()
    print(outcome.table)
    if outcome.summary:
        print(f"{outcome.summary} in {outcome.seconds:.0f}s")
    else:
        everything = (outcome.pretrain_ran, outcome.transfer_ran) == (outcome.pretrain_total, outcome.transfer_total)
        print(
            f"\nran {outcome.pretrain_ran}/{outcome.pretrain_total} pretraining runs and "
            f"{outcome.transfer_ran}/{outcome.transfer_total} transfer fits in {outcome.seconds:.0f}s"
            + ("." if everything else " (the others were already in MLflow).")
        )
    print(
        "browse them: mlflow ui --backend-store-uri "
        f"{redact(resolve_tracking_uri(args.tracking_uri or spec.tracking_uri))}"
    )
    if outcome.stopped and not outcome.failed:
        print(
            f"stopped: {outcome.stopped}. Finished runs are recorded in MLflow, stopped ones are KILLED and keep "
            f"their checkpoints; resume with the same command: {redact(command_line(args.argv))}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if outcome.stopped:
        print(
            f"stopped at {outcome.stopped}; runs it stopped are KILLED in MLflow and resume with the same command",
            file=sys.stderr,
        )
    if outcome.failed:
        print(
            f"{len(outcome.failed)} trial(s) failed: {'; '.join(outcome.failed)}. Run the same command again to "
            "retry them.",
            file=sys.stderr,
        )
        return EXIT_FAILED_RUNS
    if spec.datamodels is not None and spec.datamodels.counterfactual is not None:
        return _run_followup(args, spec)
    return EXIT_OK


def _run_followup(args, spec: StudySpec) -> int:
    """``datamodels.counterfactual``: plan the follow-up study from the finished sweep (as
    ``transferlab counterfactual`` does) and run it with the same tracking, storage and Ray.
    The ranking is a function of the sweep's table, so a rerun plans the same follow-up and
    MLflow skips what it already holds."""
    from orchestrator.analysis.counterfactual import arm_lines, plan_counterfactual

    c = spec.datamodels.counterfactual
    storage = args.storage_path or spec.storage_path or DEFAULT_STORAGE
    print(
        f"\n[counterfactual] planning the follow-up of '{spec.study}': remove the top "
        f"{', '.join(map(str, c.remove_top))} "
        f"{'/'.join(c.arms)} classes, {c.seeds} seed(s) each"
    )
    tracker = Tracker(resolve_tracking_uri(args.tracking_uri or spec.tracking_uri))
    try:
        path, plan = plan_counterfactual(
            tracker, spec, list(c.remove_top), c.arms, seeds=c.seeds, out=os.path.join(storage, "counterfactual")
        )
    except AnalysisError as e:
        return error(str(e))
    print("\n".join(arm_lines(plan)))
    followup = load_spec(path)
    print(
        f"[counterfactual] follow-up study '{followup.study}' ({path}); then `transferlab report {spec.study}` plots "
        "accuracy vs K"
    )
    return _run(args, followup, build_plan(followup))
