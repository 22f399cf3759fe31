"""Which device a light trial (transfer fits, datamodel batches) computes on."""

from __future__ import annotations

import os

import torch


def trial_device(use_gpu: bool) -> torch.device:
    """The trial's GPU share when the study uses GPUs, else the CPU.

    Ray gives a trial that asked for a fraction of a GPU that GPU alone (``CUDA_VISIBLE_DEVICES``),
    so it is ``cuda`` (index 0) inside the trial; several trials then share one device.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise RuntimeError(
            f"resources.use_gpu is true but this trial sees no CUDA device (CUDA_VISIBLE_DEVICES={visible})"
        )
    return torch.device("cuda")
