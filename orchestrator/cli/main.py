"""``transferlab``: parse the command line, call the command, map what went wrong to one line
and an exit code (:mod:`orchestrator.cli.exits`)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import importlib

from datasets_.objstore import DatasetError
from orchestrator.cli.exits import EXIT_BUSY, EXIT_INTERRUPTED, error
from orchestrator.cli.parser import JOB_COMMANDS, build_parser
from orchestrator.records.credentials import load_credential_files
from orchestrator.records.lease import StudyBusy
from orchestrator.records.retry import TrackingUnavailable
from orchestrator.spec import SpecError

# Each command's module, imported only when that command runs: their imports (torch, Ray, MLflow,
# matplotlib) take seconds, and `--help` or a job's `status` needs none of most of them.
MODULES = {
    "validate": "study_commands",
    "config": "study_commands",
    "schema": "study_commands",
    "plan": "study_commands",
    "run": "study_commands",
    "data": "data_commands",
    "runs": "analysis_commands",
    "report": "analysis_commands",
    "counterfactual": "analysis_commands",
    **{c: "job_commands" for c in JOB_COMMANDS},
}


def main(argv: list[str] | None = None) -> int:
    # Progress lines must reach a log file or `ray job logs` as they happen, not when a block
    # buffer fills: line-buffer stdout even when it is not a terminal.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    # KEY=VALUE overrides may come after options too (`run s.yaml --address auto epochs=1`).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    args.argv = argv
    module = importlib.import_module(f"orchestrator.cli.{MODULES[args.command]}")
    try:
        load_credential_files()  # MLFLOW_TRACKING_PASSWORD_FILE ... (a mounted Secret)
    except ValueError as e:
        return error(str(e))
    try:
        return module.run(args)
    except SpecError as e:
        return error(str(e))
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except (TrackingUnavailable, OSError, DatasetError) as e:
        if args.command != "run":
            raise
        return module.stopped(e, argv)
    except KeyboardInterrupt:
        print("interrupted: finished runs are recorded; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
