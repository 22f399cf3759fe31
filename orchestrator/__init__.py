"""transferlab's orchestrator: study spec, planning, Ray Tune sweeps, MLflow records, CLI.

The only layer that knows the study grid, Ray Tune and MLflow together.
"""

__version__ = "0.2.0"
