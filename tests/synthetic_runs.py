"""Writes synthetic studies into a real MLflow store, in transferlab's schema, with planted truth.

Used by the analysis tests and benchmarks/report.py: the runs look exactly like those
``transferlab run`` writes (kinds, parent tags, params, metrics, class-mask and per-example
artifacts), only their numbers come from formulas the tests know.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.records.schema import (
    FINISHED,
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    METRIC_ACCURACY,
    METRIC_MEAN_PER_CLASS_ACCURACY,
    METRIC_NUM_TRAIN_SAMPLES,
    METRIC_UPSTREAM_ACCURACY,
    PARAM_CLASS_FRACTION,
    PER_EXAMPLE_ARTIFACT,
    RUNNING,
    TAG_CONFIG_HASH,
    TAG_KIND,
    TAG_PARENT,
    TAG_STUDY,
    VIEW_MASK_ARTIFACT,
)


class SyntheticStudy:
    """One study (MLflow experiment) with its study run; add pretraining and transfer runs."""

    def __init__(self, tracking_uri: str, study: str, artifact_root: str | Path):
        self.client = MlflowClient(tracking_uri)
        self.study = study
        self.experiment_id = self.client.create_experiment(
            study, artifact_location=Path(artifact_root, study).resolve().as_uri()
        )
        self.study_run = self._run(KIND_STUDY, f"study {study}", {"study": study}, {})

    def _run(
        self, kind: str, name: str, params: dict, metrics: dict, parent: str | None = None, status: str = FINISHED
    ) -> str:
        tags = {TAG_KIND: kind, TAG_STUDY: self.study, TAG_CONFIG_HASH: uuid.uuid4().hex[:20]}
        if parent:
            tags[TAG_PARENT] = parent
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag("mlflow.runName", name)],
        )
        if status != RUNNING:
            self.client.set_terminated(run_id, status=status)
        return run_id

    def pretrain(
        self,
        source: str,
        size,
        upstream: float,
        noise: float = 0.0,
        seed: int = 0,
        method: str = "supervised",
        model: str = "small-cnn",
        classes: list[str] | None = None,
        included: list[bool] | None = None,
        status: str = FINISHED,
    ) -> str:
        fraction = 1.0 if included is None else sum(included) / len(included)
        params = {
            "method": method,
            "source": source,
            "pretrain_size": size,
            "label_noise": noise,
            "model": model,
            "seed": seed,
            PARAM_CLASS_FRACTION: fraction,
        }
        metrics = {METRIC_UPSTREAM_ACCURACY: upstream}
        if size != "full":
            metrics[METRIC_NUM_TRAIN_SAMPLES] = size
        run_id = self._run(
            KIND_PRETRAIN,
            f"{method} {source} n={size} noise={noise:g} seed={seed}",
            params,
            metrics,
            self.study_run,
            status,
        )
        if included is not None:
            self.client.log_dict(
                run_id, {"classes": list(classes), "included": [bool(b) for b in included]}, VIEW_MASK_ARTIFACT
            )
        return run_id

    def transfer(
        self,
        parent: str,
        task: str,
        shots,
        seed: int,
        accuracy: float,
        protocol: str = "linear_probe",
        layer: str | None = None,
        per_example: pd.DataFrame | None = None,
        status: str = FINISHED,
    ) -> str:
        params = {"task": task, "protocol": protocol, "shots": shots, "seed": seed, "val_fraction": 0.2}
        if layer is not None:
            params["layer"] = layer
        metrics = {METRIC_ACCURACY: accuracy, METRIC_MEAN_PER_CLASS_ACCURACY: accuracy}
        run_id = self._run(
            KIND_TRANSFER, f"{protocol} {task} {shots}-shot seed={seed}", params, metrics, parent, status
        )
        if per_example is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(PER_EXAMPLE_ARTIFACT).name
                per_example.to_parquet(path, index=False)
                self.client.log_artifact(run_id, str(path), str(Path(PER_EXAMPLE_ARTIFACT).parent))
        return run_id


def per_example_frame(correct_prob) -> pd.DataFrame:
    """outputs/per_example.parquet for given correct-class probabilities (labels and keys synthetic)."""
    n = len(correct_prob)
    return pd.DataFrame(
        {
            "example": range(n),
            "key": [f"ex{i:05d}" for i in range(n)],
            "label": [i % 10 for i in range(n)],
            "prediction": [i % 10 for i in range(n)],
            "correct_prob": list(correct_prob),
            "margin": [float(p) - 0.5 for p in correct_prob],
        }
    )
