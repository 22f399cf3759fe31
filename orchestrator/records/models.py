"""Pretrained checkpoints as MLflow logged models, for review and download in the MLflow UI.

Each FINISHED pretraining run's checkpoint is also an MLflow 3 *logged model*
(:func:`log_pretrained_model`): the run is its source (the run's "Logged models" box, the
experiment's "Models" tab), it is stored in MLflow's PyTorch format (``MLmodel``, the pickled
``torch.nn.Module`` with the checkpoint's weights and ``model.meta``, ``requirements.txt``), and
``mlflow.pytorch.load_model("models:/MODEL_ID")`` loads it back wherever transferlab is
installed (the model's classes are transferlab's and torchvision/timm/open_clip's). The
pretraining run is tagged ``transferlab.model_id``; every transfer run fitted on that checkpoint
names the model as its input (:func:`model_inputs`), so the UI links the two both ways.

The checkpoint in the study's storage stays what transfer trials read; the logged model is a
copy for people. Logging goes through the tracker's retrying client, so a tracking outage is
ridden out up to the study's deadline like any other record.
"""

from __future__ import annotations

import logging
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version

MODEL_TYPE = "pretrained"  # the logged models' model_type: the UI's models table filters on it
MODEL_ARTIFACT_FILES = ("MLmodel", "data/model.pth")  # what a complete logged model holds, at least


def model_name(run_name: str) -> str:
    """The logged model's name: the run's name without the characters MLflow refuses in a model
    name (``/ : . % " '``), e.g. "supervised mnist n=300 noise=0_5"."""
    return re.sub(r"[/:.%\"']", "_", run_name).strip() or "pretrained"


def requirements() -> list[str]:
    """What loading the model needs, stated (inferring them would import and time the model)."""
    out = []
    for package in ("torch", "transferlab"):
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def log_pretrained_model(
    client, experiment_id: str, run_id: str, model, name: str, step: int, params: dict[str, str]
) -> str:
    """Log ``model`` (a ``torch.nn.Module``, on the CPU) as a READY logged model whose source is
    run ``run_id`` at ``step`` (its last epoch), with ``params`` (the run's settings); tag the
    run with its id (``TAG_MODEL_ID``) and return the id. ``client``: an ``MlflowClient`` (the
    tracker's retrying one)."""
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from orchestrator.records.schema import TAG_MODEL_ID

    logged = client.create_logged_model(
        experiment_id, name=model_name(name), source_run_id=run_id, params=params, model_type=MODEL_TYPE
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        with tempfile.TemporaryDirectory() as d, _quiet("mlflow.pytorch"), _no_requirement_check():
            folder = f"{d}/model"
            mlflow.pytorch.save_model(
                model,
                folder,
                mlflow_model=Model(artifact_path=logged.artifact_location, model_id=logged.model_id, run_id=run_id),
                pip_requirements=requirements(),
                # The module pickled whole: any architecture loads back; "pt2" would trace it.
                serialization_format="pickle",
            )
            client.log_model_artifacts(logged.model_id, folder)
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, "FAILED")
        except Exception:
            pass  # the model stays PENDING; the run is not tagged with it, so it is logged again
        raise
    client.set_tag(run_id, TAG_MODEL_ID, logged.model_id)
    return logged.model_id


class _quiet:
    """Logger ``name`` below ERROR muted inside the block: MLflow warns on every pickled model
    that loading one runs its code (the README says so once: load models of stores you trust)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class _no_requirement_check:
    """Inside the block, MLflow does not check the stated requirements against this environment:
    they are read from it (:func:`requirements`), and the check maps every installed package to
    its modules on its first call in a process (2-6 s measured, once per trial process)."""

    def __enter__(self):
        import mlflow.utils.environment as env

        self.env, self.check = env, getattr(env, "warn_dependency_requirement_mismatches", None)
        if self.check is not None:
            env.warn_dependency_requirement_mismatches = lambda requirements: None

    def __exit__(self, *exc):
        if self.check is not None:
            self.env.warn_dependency_requirement_mismatches = self.check


def model_inputs(model_ids) -> list:
    """The ``log_inputs(models=...)`` entries naming the logged models a run used."""
    from mlflow.entities import LoggedModelInput

    return [LoggedModelInput(m) for m in model_ids if m]
