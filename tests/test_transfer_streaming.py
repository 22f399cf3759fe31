"""Fine-tuning and scoring a task too large to hold decoded: the images stream batch by batch
and only the shots are decoded, with results identical to holding the split in memory."""

import numpy as np
import pandas as pd
import pytest
import torch

from datasets_ import prepare_builtin
from datasets_.pipeline import decode_rows, decode_split
from trainers.methods import build_pretrain_model
from trainers.models import model_config
from trainers.pretrain import save_checkpoint
from trainers.transfer import FinetuneSettings, Fit, TransferConfig, evaluate_transfer


def test_decode_rows_returns_the_asked_rows_in_the_asked_order():
    task = prepare_builtin("digits")
    whole, labels, keys = decode_split(task, "test", 16)
    rows = np.random.default_rng(0).permutation(len(labels))[:37]
    assert torch.equal(decode_rows(task, "test", 16, rows, batch_size=10), whole[rows])
    with pytest.raises(IndexError, match="past the split"):
        decode_rows(task, "test", 16, [len(labels)])


def test_streamed_finetuning_equals_held_in_memory(tmp_path, monkeypatch):
    task = prepare_builtin("digits")
    torch.manual_seed(0)
    model = build_pretrain_model("supervised", model_config("tiny-cnn"), 10, 16)
    meta = {"method": "supervised", "model_config": model_config("tiny-cnn"), "num_classes": 10, "image_size": 16}
    save_checkpoint(str(tmp_path), model, meta)
    fits = [Fit("finetune", 2, 0), Fit("lp_ft", 3, 1)]
    config = TransferConfig(finetune=FinetuneSettings(lr=(1e-2,), steps=5, batch_size=8))
    held, _ = evaluate_transfer(str(tmp_path), task, fits, config)
    monkeypatch.setenv("TRANSFERLAB_MAX_HELD_IMAGE_BYTES", "0")  # nothing fits: every split streams
    streamed, _ = evaluate_transfer(str(tmp_path), task, fits, config)
    for a, b in zip(held, streamed):
        assert a.metrics == b.metrics
        pd.testing.assert_frame_equal(a.outputs, b.outputs)
    assert len(held[0].outputs) == task.num_samples("test") and 0.0 <= held[0].metrics["accuracy"] <= 1.0
