"""The command line's exit codes, and the one-line error every command reports bad input with.

0 success; 1 the study ran but some runs failed (with ``--fail-fast``: it stopped at the first);
2 bad input (spec, data, tracking URI, storage path, a study over its ``budget``), reported as
one line before any compute starts; 3 the study stopped before its end because the tracking
server stayed unreachable, storage failed or ``budget.max_hours`` passed — its state is
resumable, and the message says how (the same ``transferlab run`` command); 4 another driver
is running the study (its lease is live: :mod:`orchestrator.records.lease`), nothing was done.
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED_RUNS, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_BUSY = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C, or a stopped Ray job


def error(msg: str) -> int:
    """Say ``msg`` as one ``error:`` line on stderr; the bad-input exit code."""
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def command_line(argv: list[str] | None) -> str:
    """The command as the user typed it (to say how to resume)."""
    import shlex

    return "transferlab " + shlex.join(sys.argv[1:] if argv is None else argv)
