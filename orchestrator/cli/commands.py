"""The ``transferlab`` command line.

Exit codes: 0 success; 1 the study ran but some runs failed (with ``--fail-fast``: it stopped at
the first); 2 bad input (spec, data, tracking URI, storage path, a study over its ``budget``),
reported as one line before any compute starts; 3 the study stopped before its end because the
tracking server stayed unreachable, storage failed or ``budget.max_hours`` passed — its state is
resumable, and the message says how (the same ``transferlab run`` command).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXIT_OK, EXIT_FAILED_RUNS, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transferlab",
        description="Transfer-learning studies on Ray, recorded in MLflow.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_args(sp):
        sp.add_argument("study_file", metavar="STUDY.yaml", help="study spec file")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override spec fields, e.g. pretrain.epochs=1")
        sp.add_argument("--quick", action="store_true", help="apply the study file's quick: section (a toy-size variant, named STUDY-quick)")

    v = sub.add_parser("validate", help="check a study spec and its data without running anything")
    study_args(v)

    pl = sub.add_parser("plan", help="print what `run` would do (jobs to run / cached / resumed, trials, estimated time); runs nothing")
    study_args(pl)
    pl.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides the spec's tracking_uri)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    r = sub.add_parser("run", help="run a study (skipping every run MLflow already holds)")
    study_args(r)
    r.add_argument("--fail-fast", action="store_true", help="stop the study at the first failed trial (default: record it FAILED and go on)")
    r.add_argument("--address", default=None, help="Ray cluster to join ('auto' for a `ray start` cluster); default: a private local Ray")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides the spec's tracking_uri)")
    r.add_argument("--storage-path", default=None, help="where checkpoints go (default: ./transferlab_storage)")

    from orchestrator.jobs_cli import add_parsers as add_job_parsers

    add_job_parsers(sub, study_args)

    d = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prep = dsub.add_parser("prepare", help="convert a source (builtin:NAME, image folder, WebDataset tars, Parquet) to Parquet or WebDataset shards + manifest")
    prep.add_argument("src", help="builtin:NAME, an image folder, a .tar / {00000..00009}.tar pattern / folder of tars, or Parquet")
    prep.add_argument("--out", required=True, help="output directory (replaced if it exists), or s3://bucket/prefix")
    prep.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="output shards: parquet (default) or img2dataset-compatible webdataset tars")
    prep.add_argument("--shard-size", type=int, default=2000, help="samples per shard (default 2000)")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="held-out share for sources without their own split (default 0.2)")
    prep.add_argument("--on-bad-sample", choices=["skip", "error"], default="skip", help="skip and count bad samples (default) or stop at the first")
    ins = dsub.add_parser("inspect", help="print a dataset's manifest (computed by a scan if it has none)")
    ins.add_argument("uri", metavar="DIR_OR_URI")
    ins.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ov = dsub.add_parser("overlap", help="exact and near-duplicate images between two datasets (leakage check)")
    ov.add_argument("a", metavar="A", help="builtin:NAME or a prepared dataset directory (e.g. a pretraining source)")
    ov.add_argument("b", metavar="B", help="builtin:NAME or a prepared dataset directory (e.g. a downstream task)")
    ov.add_argument("--max-distance", type=int, default=10, help="dHash Hamming distance of near-duplicate candidates (default 10 of 64 bits); candidates are confirmed on 16x16 thumbnails")
    ov.add_argument("--json", action="store_true", help="print every pair as JSON")
    for sp in (prep, ins):
        sp.add_argument("--image-column", default="jpg", help="Parquet sources: encoded-image column (default jpg, else image)")
        sp.add_argument("--label-column", default="label", help="Parquet sources: integer label column")
        sp.add_argument("--caption-column", default="caption", help="Parquet sources: caption column")
        sp.add_argument("--key-column", default="key", help="Parquet sources: sample key column")

    q = sub.add_parser("runs", help="print a study's results table from MLflow")
    q.add_argument("study", help="study name (the MLflow experiment)")
    q.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")

    rep = sub.add_parser("report", help="the papers' figures and fits for a study, as one HTML file (+ CSV, PNG, JSON)")
    rep.add_argument("study", help="study name (the MLflow experiment)")
    rep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")
    rep.add_argument("--out", default=None, help="output folder (default: reports/STUDY)")
    rep.add_argument("--json", action="store_true", help="print the fitted numbers as JSON")
    rep.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for confidence intervals (default 200)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstraps (default 0)")
    rep.add_argument("--no-log", action="store_true", help="do not log the report as artifacts on the study run")

    cfp = sub.add_parser("counterfactual", help="plan the follow-up study that removes the K most harmful / helpful / random source classes")
    cfp.add_argument("study", help="study name (the MLflow experiment) with class-subset pretraining runs or a datamodel sweep")
    cfp.add_argument("--spec", required=True, metavar="STUDY.yaml", help="the study's spec file (the follow-up keeps its settings)")
    cfp.add_argument("--quick", action="store_true", help="the study ran with --quick: read the spec's quick: section too")
    cfp.add_argument("--remove-top", required=True, type=int, nargs="+", metavar="K", help="numbers of classes to remove, e.g. 1 2 4")
    cfp.add_argument("--arms", nargs="+", default=["harmful", "helpful", "random"], help="which classes to remove (default: all three arms)")
    cfp.add_argument("--task", default=None, help="target task whose influence ranks the classes (default: the first with influence)")
    cfp.add_argument("--source", default=None, help="the source whose classes are removed (default: the study's only source)")
    cfp.add_argument("--name", default=None, help="follow-up study name (default: STUDY-counterfactual)")
    cfp.add_argument("--out", default=".", help="folder for the follow-up YAML and plan (default: here)")
    cfp.add_argument("--seed", type=int, default=0, help="seed of the random arm (default 0)")
    cfp.add_argument("--seeds", type=int, default=None, metavar="N",
                     help="pretraining seeds 0..N-1 of every follow-up source (default: the study's; 3 for a datamodels study)")
    cfp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default store here)")
    return p


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    # Progress lines must reach a log file or `ray job logs` as they happen, not when a block
    # buffer fills: line-buffer stdout even when it is not a terminal.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = _parser()
    # KEY=VALUE overrides may come after options too (`run s.yaml --address auto epochs=1`).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    args.argv = argv
    from orchestrator.retry import TrackingUnavailable
    from orchestrator.spec import SpecError, load_spec

    try:
        if args.command == "runs":
            return _runs(args)
        if args.command in ("report", "counterfactual"):
            return _analysis(args)
        if args.command == "data":
            return _data(args)
        if args.command in ("submit", "status", "logs", "stop"):
            from orchestrator.jobs_cli import run as run_job_command

            return run_job_command(args)
        spec = load_spec(args.study_file, args.overrides, quick=args.quick)
        from orchestrator.plan import build_plan

        plan = build_plan(spec)
        if args.command == "plan" and plan.datamodels is not None:
            print(f"{_datamodels_line(spec)}; models already in the sweep's table are skipped when it runs")
            return EXIT_OK
        if args.command == "plan":
            return _plan(args, spec, plan)
        if args.command == "validate":
            budgeted = spec.budget.max_trials is not None or spec.budget.max_hours is not None
            if spec.tracking_uri or budgeted:  # a budget counts only what MLflow does not hold yet
                _check_infrastructure(spec.tracking_uri, None, "tracking_uri", None)
            if plan.datamodels is not None:
                print(f"ok: {_datamodels_line(spec)}")
                return EXIT_OK
            if budgeted:
                _summary(spec, plan, None, budget=True)
            print(
                f"ok: study '{spec.study}': {len(plan.pretrain_jobs)} pretraining runs, "
                f"{plan.num_transfer_fits} transfer fits on {len(spec.transfer_tasks)} task(s)"
            )
            return EXIT_OK
        from orchestrator.study import DEFAULT_STORAGE

        tracking_field = "--tracking-uri" if args.tracking_uri else "tracking_uri"
        _check_infrastructure(args.tracking_uri or spec.tracking_uri, None, tracking_field, None)
        if plan.datamodels is not None:
            _datamodels_line(spec)  # its budget check
        else:
            _summary(spec, plan, args.tracking_uri, budget=True)  # before the storage probe writes anything
        _check_infrastructure(args.tracking_uri or spec.tracking_uri, args.storage_path or spec.storage_path or DEFAULT_STORAGE,
                              tracking_field, "--storage-path" if args.storage_path else "storage_path")
        return _run(args, spec, plan)
    except SpecError as e:
        return _error(str(e))
    except (TrackingUnavailable, OSError) as e:
        if args.command != "run":
            raise
        return _stopped(e, argv)
    except KeyboardInterrupt:
        print("interrupted: finished runs are recorded; run the same command again to continue", file=sys.stderr)
        return 130


def _datamodels_line(spec) -> str:
    """A datamodels study in one line; refuses one whose trials exceed ``budget.max_trials``."""
    from orchestrator.spec import SpecError

    d = spec.datamodels
    trials = -(-d.num_models // d.models_per_trial)
    if spec.budget.max_trials is not None and trials > spec.budget.max_trials:
        raise SpecError("budget.max_trials", f"the datamodel sweep needs {trials} trials, {trials - spec.budget.max_trials} over the "
                                             f"budget of {spec.budget.max_trials}; raise datamodels.models_per_trial or the budget")
    return (f"study '{spec.study}': datamodel sweep of {d.num_models} models on {d.class_fraction:g} of the classes "
            f"of '{d.source}', {trials} trials of up to {d.models_per_trial} models, probed on '{d.task}'")


def _summary(spec, plan, tracking_uri, budget: bool):
    """The plan summary against MLflow (read only); with ``budget``, refuse a study over it."""
    from orchestrator.estimate import check_budget, read_state, summarize
    from orchestrator.spec import SpecError
    from orchestrator.tracking import resolve_tracking_uri

    field = "--tracking-uri" if tracking_uri else "tracking_uri"
    try:
        uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    except ValueError as e:
        raise SpecError(field, str(e)) from None
    summary = summarize(plan, read_state(uri, spec.study))
    if budget:
        check_budget(spec, summary)
    return summary, uri


def _plan(args, spec, plan) -> int:
    import json

    from orchestrator.estimate import format_summary
    from orchestrator.retry import redact

    _check_infrastructure(args.tracking_uri or spec.tracking_uri, None, "--tracking-uri" if args.tracking_uri else "tracking_uri", None)
    summary, uri = _summary(spec, plan, args.tracking_uri, budget=False)
    if args.json:
        print(json.dumps({**summary.to_dict(), "tracking_uri": redact(uri)}, indent=1))
    else:
        print(format_summary(summary, spec, redact(uri)))
    from orchestrator.estimate import check_budget

    check_budget(spec, summary)  # printed first, so the refusal comes with the numbers
    return EXIT_OK


def _check_infrastructure(tracking_uri, storage, tracking_field, storage_field) -> None:
    """The tracking server answers and the storage path takes a write, before any compute."""
    from orchestrator.preflight import check_storage, check_tracking
    from orchestrator.spec import SpecError
    from orchestrator.tracking import resolve_tracking_uri

    try:
        check_tracking(resolve_tracking_uri(tracking_uri))
    except ValueError as e:
        raise SpecError(tracking_field, str(e)) from None
    if storage is not None:
        try:
            check_storage(storage)
        except ValueError as e:
            raise SpecError(storage_field, str(e)) from None


def _stopped(e: Exception, argv: list[str] | None) -> int:
    """The study stopped mid-way (tracking outage past its deadline, storage failure)."""
    import shlex

    from orchestrator.retry import redact

    what = str(e) if not isinstance(e, OSError) else f"storage failed: {e.strerror or e} ({getattr(e, 'filename', '') or ''})"
    command = "transferlab " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"stopped: {redact(what)}. Finished runs are recorded in MLflow and checkpoints kept in storage; "
          f"when the problem is fixed, resume with the same command: {redact(command)}", file=sys.stderr)
    return EXIT_STOPPED


def _run(args, spec, plan) -> int:
    from orchestrator.retry import redact
    from orchestrator.study import run_study
    from orchestrator.tracking import resolve_tracking_uri

    outcome = run_study(spec, address=args.address, tracking_uri=args.tracking_uri, storage_path=args.storage_path, plan=plan,
                        fail_fast=args.fail_fast)
    print()
    print(outcome.table)
    if outcome.summary:
        print(f"{outcome.summary} in {outcome.seconds:.0f}s")
    else:
        print(
            f"\nran {outcome.pretrain_ran}/{outcome.pretrain_total} pretraining runs and "
            f"{outcome.transfer_ran}/{outcome.transfer_total} transfer fits in {outcome.seconds:.0f}s"
            + (" (the others were already in MLflow)." if (outcome.pretrain_ran, outcome.transfer_ran) != (outcome.pretrain_total, outcome.transfer_total) else ".")
        )
    print(f"browse them: mlflow ui --backend-store-uri {redact(resolve_tracking_uri(args.tracking_uri or spec.tracking_uri))}")
    if outcome.stopped and not outcome.failed:
        import shlex

        command = "transferlab " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
        print(f"stopped: {outcome.stopped}. Finished runs are recorded in MLflow, stopped ones are KILLED and keep "
              f"their checkpoints; resume with the same command: {redact(command)}", file=sys.stderr)
        return EXIT_STOPPED
    if outcome.stopped:
        print(f"stopped at {outcome.stopped}; runs it stopped are KILLED in MLflow and resume with the same command", file=sys.stderr)
    if outcome.failed:
        print(f"{len(outcome.failed)} trial(s) failed: {'; '.join(outcome.failed)}. Run the same command again to retry them.", file=sys.stderr)
        return EXIT_FAILED_RUNS
    if spec.datamodels is not None and spec.datamodels.counterfactual is not None:
        return _run_followup(args, spec)
    return EXIT_OK


def _run_followup(args, spec) -> int:
    """``datamodels.counterfactual``: plan the follow-up study from the finished sweep (as
    ``transferlab counterfactual`` does) and run it with the same tracking, storage and Ray.
    The ranking is a function of the sweep's table, so a rerun plans the same follow-up and
    MLflow skips what it already holds."""
    import types

    from orchestrator.analysis import AnalysisError
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from orchestrator.study import DEFAULT_STORAGE
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    c = spec.datamodels.counterfactual
    storage = args.storage_path or spec.storage_path or DEFAULT_STORAGE
    cf_args = types.SimpleNamespace(study=spec.study, task=None, source=None, remove_top=list(c.remove_top), arms=list(c.arms),
                                    seed=0, seeds=c.seeds, name=None, out=os.path.join(storage, "counterfactual"))
    print(f"\n[counterfactual] planning the follow-up of '{spec.study}': remove the top {', '.join(map(str, c.remove_top))} "
          f"{'/'.join(c.arms)} classes, {c.seeds} seed(s) each")
    try:
        path, plan = _plan_counterfactual(cf_args, spec, Tracker(resolve_tracking_uri(args.tracking_uri or spec.tracking_uri)))
    except AnalysisError as e:
        return _error(str(e))
    followup = load_spec(path)
    print(f"[counterfactual] follow-up study '{followup.study}' ({path}); then `transferlab report {spec.study}` plots accuracy vs K")
    return _run(args, followup, build_plan(followup))


def _data(args) -> int:
    import json

    from datasets_ import DatasetError
    from datasets_.prepare import inspect, prepare

    try:
        if args.data_command == "overlap":
            return _overlap(args)
        columns = {"image_column": args.image_column, "label_column": args.label_column,
                   "caption_column": args.caption_column, "key_column": args.key_column}
        if args.data_command == "prepare":
            if args.shard_size < 1:
                return _error(f"--shard-size: must be >= 1, got {args.shard_size}")
            if not 0.0 <= args.test_fraction < 1.0:
                return _error(f"--test-fraction: must be in [0, 1), got {args.test_fraction}")
            ds, bad = prepare(args.src, args.out, args.shard_size, args.test_fraction, args.on_bad_sample, args.format, **columns)
            m = ds.manifest
            print(f"prepared {args.out}: {m['num_samples']} samples, {m['num_classes']} classes, "
                  f"{len(m['shards'])} shards, fingerprint {m['fingerprint']}")
            if bad.total:
                print(f"skipped {bad.total} bad sample(s): " + ", ".join(f"{k} x{v}" for k, v in bad.counts.items()), file=sys.stderr)
            return EXIT_OK
        m = inspect(args.uri, **columns)
    except DatasetError as e:
        return _error(str(e))
    if args.json:
        print(json.dumps(m, indent=1))
        return EXIT_OK
    splits = m["splits"]
    split_text = ", ".join(f"{k} {v['num_samples'] if isinstance(v, dict) else v}" for k, v in splits.items())
    print(f"{m['name']}: {m['num_samples']} samples ({split_text}), {m['num_classes']} classes, fingerprint {m['fingerprint']}")
    if m["classes"]:
        shown = ", ".join(m["classes"][:20]) + (" ..." if len(m["classes"]) > 20 else "")
        print(f"classes: {shown}")
    bad = m.get("bad_samples", {}).get("total", 0)
    if bad:
        print(f"bad samples: {bad} ({m['bad_samples']['by_reason']})")
    return EXIT_OK


def _overlap(args) -> int:
    import json

    from datasets_ import resolve_dataset
    from datasets_.overlap import find_overlap

    if not 0 <= args.max_distance <= 64:
        return _error(f"--max-distance: must be in 0..64, got {args.max_distance}")
    report = find_overlap(resolve_dataset(args.a), resolve_dataset(args.b), max_distance=args.max_distance)
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    print(f"{report['a']} vs {report['b']}: {report['exact']} exact and {report['near']} near-duplicate pair(s) "
          f"({report['candidates']} dHash candidates within {report['max_distance']} bits, confirmed on thumbnails)")
    for p in report["pairs"][:20]:
        print(f"  {p['kind']:<5} d={p['distance']:<2} {p['a_split']}/{p['a_key']}  ~  {p['b_split']}/{p['b_key']}")
    if len(report["pairs"]) > 20:
        print(f"  ... {len(report['pairs']) - 20} more (--json lists all)")
    return EXIT_OK


def _runs(args) -> int:
    from orchestrator.results import results_table, transfer_frame
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except ValueError as e:
        return _error(f"--tracking-uri: {e}")
    tracker = Tracker(uri)
    if tracker.experiment_id(args.study, create=False) is None:
        return _error(f"study: no study named '{args.study}' in {uri}")
    print(results_table(transfer_frame(tracker, args.study)))
    return EXIT_OK


def _analysis(args) -> int:
    """``report`` and ``counterfactual``: both read a study's runs with orchestrator.analysis."""
    from orchestrator.analysis import AnalysisError
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except ValueError as e:
        return _error(f"--tracking-uri: {e}")
    try:
        return (_report if args.command == "report" else _counterfactual)(args, Tracker(uri))
    except AnalysisError as e:
        return _error(str(e))


def _report(args, tracker) -> int:
    import json

    from orchestrator.analysis import AnalysisError
    from orchestrator.analysis.report import build_report, log_report, write_report

    if args.bootstrap < 0:
        raise AnalysisError("--bootstrap", f"must be >= 0, got {args.bootstrap}")
    rep = build_report(tracker, args.study, n_boot=args.bootstrap, seed=args.seed)
    out = args.out or os.path.join("reports", args.study)
    path = write_report(rep, out)
    study_run = rep.study_run_id
    if study_run and not args.no_log:
        log_report(tracker, study_run, out)
    if args.json:
        print(json.dumps(rep.numbers, indent=1, default=str))
    else:
        print(f"{rep.status_line}{' (partial results)' if rep.partial else ''}")
        print(f"report: {path} ({len(rep.figures)} figures, {len(rep.tables)} tables as CSV)"
              + (f"; logged on the study run under report/" if study_run and not args.no_log else ""))
    return EXIT_OK


def _counterfactual(args, tracker) -> int:
    from orchestrator.analysis import AnalysisError
    from orchestrator.analysis import counterfactual as cf
    from orchestrator.analysis.frame import load_study
    from orchestrator.analysis.influence import ranking, task_influence
    from orchestrator.spec import load_spec

    spec = load_spec(args.spec, quick=args.quick)
    if spec.study != args.study:
        raise AnalysisError("--spec", f"is the spec of study '{spec.study}', not '{args.study}'")
    path, _ = _plan_counterfactual(args, spec, tracker)
    print(f"follow-up study: {path}; run it with: transferlab run {path}")
    print(f"then: transferlab report {args.study}  plots target accuracy vs K for each arm")
    return EXIT_OK


def _plan_counterfactual(args, spec, tracker):
    """Rank the classes of ``spec``'s finished study, write the follow-up study under ``args.out``
    and log its plan on the study run; returns (follow-up YAML path, plan)."""
    from orchestrator.analysis import AnalysisError
    from orchestrator.analysis import counterfactual as cf
    from orchestrator.analysis.frame import load_study
    from orchestrator.analysis.influence import ranking, task_influence

    bad = [a for a in args.arms if a not in cf.ARMS]
    if bad:
        raise AnalysisError("--arms", f"unknown arm {bad[0]!r}; choose from: {', '.join(cf.ARMS)}")
    if args.seeds is not None and args.seeds < 1:
        raise AnalysisError("--seeds", f"must be >= 1, got {args.seeds}")
    sr = load_study(tracker, args.study)
    inputs = (_datamodel_influence if spec.datamodels is not None else _class_subset_influence)(args, spec, sr, tracker)
    rank = ranking(inputs.classes, task_influence(inputs.masks, inputs.outputs))
    doc, plan = cf.plan_followup(spec, inputs.source, rank, args.remove_top, args.arms, inputs.task, seed=args.seed,
                                 name=args.name, seeds=args.seeds)
    path = cf.write_followup(doc, plan, args.out)
    if sr.study_run_id:
        cf.log_plan(tracker, sr.study_run_id, plan)
    for src, info in plan["sources"].items():
        if info["arm"] != cf.BASELINE:
            print(f"{info['arm']:>8} K={info['k']}: drop {', '.join(info['removed_classes'])}  (source {src})")
    return path, plan


def _class_subset_influence(args, spec, sr, tracker):
    """Influence inputs from the class-subset pretraining runs of ``--source`` on ``--task``."""
    from orchestrator.analysis import AnalysisError
    from orchestrator.analysis.frame import influence_inputs

    sources = list(spec.pretrain.sweep["source"])
    source = args.source or (sources[0] if len(sources) == 1 else None)
    if source is None:
        raise AnalysisError("--source", f"the study has several sources ({', '.join(sources)}); name one")
    tasks = [args.task] if args.task else list(dict.fromkeys(sr.transfer["task"]))
    inputs = next((x for task in tasks for protocol in sorted(set(sr.transfer["protocol"]))
                   if (x := influence_inputs(sr, task, protocol, source=source)) is not None), None)
    if inputs is None:
        raise AnalysisError("study", f"'{args.study}' has no class-subset runs with per-example outputs"
                            + (f" on task '{args.task}'" if args.task else "") + " to estimate influence from")
    return inputs


def _datamodel_influence(args, spec, sr, tracker):
    """Influence inputs from the table of the spec's datamodel sweep (the latest such sweep of the study)."""
    from orchestrator.analysis import AnalysisError
    from orchestrator.analysis.datamodels import datamodel_inputs

    d = spec.datamodels
    for flag, given, own in (("--task", args.task, d.task), ("--source", args.source, d.source)):
        if given is not None and given != own:
            raise AnalysisError(flag, f"the datamodel sweep of study '{spec.study}' has {flag[2:]} '{own}', not '{given}'")
    found = [x for x in datamodel_inputs(tracker, sr.experiment_id)
             if (x.task, x.source, x.protocol, x.shots) == (d.task, d.source, d.protocol, str(d.shots))]
    if not found:
        raise AnalysisError("study", f"'{args.study}' has no datamodel sweep of '{d.source}' probed on '{d.task}' with "
                                     "at least 2 finished models; run the study first")
    return found[-1]


if __name__ == "__main__":
    sys.exit(main())
