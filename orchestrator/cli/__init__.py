"""The ``transferlab`` command line on top of the orchestrator: parse, call, print.

``main`` is the console script; ``python -m orchestrator.cli`` runs it too.
"""

from orchestrator.cli.main import main

__all__ = ["main"]
