"""Analysis of a study: MLflow runs ► DataFrames ► fits, influence, tables, figures, report.

``frame`` reads MLflow (the only module here that does, with ``report``'s artifact logging and
``counterfactual``'s plan); ``fits`` and ``influence`` are pure functions on arrays and frames;
``figures`` draws them; ``report`` assembles the HTML; ``counterfactual`` plans follow-up studies.
"""

import os

# The analysis downloads many small artifacts; MLflow's per-download progress bars would flood stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class AnalysisError(ValueError):
    """Bad input to an analysis command, phrased as ``FIELD: what is wrong``."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")
