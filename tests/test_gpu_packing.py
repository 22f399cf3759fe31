"""Fractional-GPU packing of light trials (transfer fits, datamodel batches): the resources they
ask Ray for, how many the cluster holds, and the device they pick. No GPU here: the CUDA path
itself runs only where one is lent; these pin down what is decided before it."""

import pytest
import yaml

from orchestrator.planning.estimate import transfer_concurrency
from orchestrator.spec import LIGHT_TRIAL_GPUS, Resources, SpecError, load_spec
from trainers.devices import trial_device

STUDY = {
    "study": "gpu",
    "sources": {"mnist": {"uri": "builtin:digits"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {"model": "tiny-cnn"},
}


def _spec(tmp_path, resources):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "resources": resources}))
    return load_spec(path)


def test_light_trials_share_a_gpu_when_the_study_uses_gpus(tmp_path):
    cpu = _spec(tmp_path, {}).resources
    assert cpu.light_trial() == {"CPU": 1.0}
    gpu = _spec(tmp_path, {"use_gpu": True}).resources
    assert gpu.light_trial() == {"CPU": 1.0, "GPU": LIGHT_TRIAL_GPUS}
    assert gpu.light_trial(2.0) == {"CPU": 2.0, "GPU": LIGHT_TRIAL_GPUS}
    half = _spec(tmp_path, {"use_gpu": True, "light_trial_gpus": 0.5}).resources
    assert half.light_trial() == {"CPU": 1.0, "GPU": 0.5}


def test_concurrency_is_bound_by_the_scarcer_resource():
    gpu = Resources(use_gpu=True)  # a quarter of a GPU and one CPU per trial
    assert gpu.light_concurrency({"CPU": 16, "GPU": 1}) == 4
    assert gpu.light_concurrency({"CPU": 3, "GPU": 2}) == 3
    assert Resources(use_gpu=True, light_trial_gpus=0.3).light_concurrency({"CPU": 64, "GPU": 1}) == 3
    assert Resources().light_concurrency({"CPU": 6}) == 6  # CPU-only trials ignore GPUs
    assert transfer_concurrency(16, gpu, 2) == 8
    assert transfer_concurrency(16, gpu, None) == 16  # offline planning: GPUs unknown, CPUs bound it
    assert transfer_concurrency(5) == 5


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "resources.light_trial_gpus: must be in (0, 1] (a share of one GPU), got 0"),
        (1.5, "resources.light_trial_gpus: must be in (0, 1] (a share of one GPU), got 1.5"),
        ("quarter", "resources.light_trial_gpus: must be a number"),
    ],
)
def test_bad_gpu_share_is_a_one_line_error(tmp_path, value, message):
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, {"use_gpu": True, "light_trial_gpus": value})
    assert str(e.value).startswith(message)


def test_trial_device():
    import torch

    assert trial_device(False) == torch.device("cpu")
    if torch.cuda.is_available():
        assert trial_device(True).type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="resources.use_gpu is true but this trial sees no CUDA device"):
            trial_device(True)
