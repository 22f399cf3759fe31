"""Supervised pretraining: the per-worker Ray Train loop and its checkpoint format.

The loop reads the ``train`` and ``heldout`` dataset shards Ray Train hands it, reports
``{"epoch", "train_loss", "images_per_second"}`` once per epoch with a checkpoint, and adds
``upstream_accuracy`` (top-1 on the held-out source split) to the last report. It knows nothing
of MLflow or of the study: whoever runs it turns reports into records.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext

import torch
from torch import nn

from datasets_.pipeline import normalize
from trainers.models import Classifier, build_model

CHECKPOINT_FILE = "model.pt"


def save_checkpoint(directory: str, model: nn.Module, meta: dict, optimizer=None, epoch: int = -1) -> str:
    """Write a checkpoint holding only tensors and plain values (loadable with weights_only)."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "epoch": epoch,
            "meta": meta,
        },
        path,
    )
    return path


def load_checkpoint(directory: str) -> dict:
    """Load a checkpoint safely: ``weights_only=True`` never unpickles arbitrary objects."""
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def load_model(directory: str) -> Classifier:
    """Rebuild the pretrained model of a checkpoint directory, in eval mode on the CPU."""
    state = load_checkpoint(directory)
    meta = state["meta"]
    model = build_model(meta["model_config"], meta["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval()


def lr_at(progress: float, base_lr: float, epochs: int, warmup_epochs: float, schedule: str) -> float:
    """Learning rate at fractional epoch ``progress``: linear warm-up, then cosine or constant."""
    if warmup_epochs > 0 and progress < warmup_epochs:
        return base_lr * (progress + 1e-3) / warmup_epochs
    if schedule == "constant":
        return base_lr
    t = (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-9)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_top1(model: nn.Module, batches, device, amp: str = "none") -> tuple[int, int]:
    """(correct, total) of ``model`` on an iterable of {"image": uint8, "label"} batches."""
    model.eval()
    correct = total = 0
    for batch in batches:
        with _autocast(device, amp):
            logits = model(normalize(batch["image"].to(device, non_blocking=True)))
        correct += int((logits.argmax(1) == batch["label"].to(device)).sum())
        total += int(batch["label"].numel())
    return correct, total


def supervised_train_loop(config: dict) -> None:
    """Ray Train per-worker loop for supervised pretraining (cross-entropy on view labels).

    Required config keys: ``model_config``, ``num_classes``, ``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``seed``, ``num_train_samples``. Optional: ``lr_schedule`` (cosine),
    ``warmup_epochs`` (0), ``amp`` ("none"|"bf16"|"fp16", CUDA only), ``meta`` (stored in the
    checkpoint).
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    amp = config.get("amp", "none")

    model = build_model(config["model_config"], config["num_classes"])
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")
    loss_fn = nn.CrossEntropyLoss()
    meta = {
        **config.get("meta", {}),
        "model_config": config["model_config"],
        "num_classes": config["num_classes"],
    }

    start_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = load_checkpoint(d)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1

    epochs, batch_size = config["epochs"], config["batch_size"]
    steps_per_epoch = max(1, math.ceil(config["num_train_samples"] / world / batch_size))
    train_shard = ray.train.get_dataset_shard("train")
    heldout_shard = ray.train.get_dataset_shard("heldout")

    for epoch in range(start_epoch, epochs):
        model.train()
        loss_sum, seen, step, t0 = 0.0, 0, 0, time.perf_counter()
        # The shard iterator is one-shot: make a new one every epoch.
        for batch in train_shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=max(1024, 4 * batch_size),
            local_shuffle_seed=config["seed"] * 1000 + epoch,
            prefetch_batches=2,
        ):
            lr = lr_at(epoch + step / steps_per_epoch, config["lr"], epochs, config.get("warmup_epochs", 0), config.get("lr_schedule", "cosine"))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = normalize(batch["image"].to(device, non_blocking=True))
            labels = batch["label"].to(device, non_blocking=True)
            with _autocast(device, amp):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(labels)
            seen += len(labels)
            step += 1
        elapsed = time.perf_counter() - t0
        loss_sum, seen, elapsed_sum = _all_reduce_sum([loss_sum, seen, elapsed], device)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "images_per_second": seen / max(elapsed_sum / world, 1e-9),
        }
        if epoch == epochs - 1:
            correct, total = evaluate_top1(model, heldout_shard.iter_torch_batches(batch_size=256), device, amp)
            correct, total = _all_reduce_sum([correct, total], device)
            metrics["upstream_accuracy"] = correct / max(total, 1)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                save_checkpoint(d, bare, meta, optimizer, epoch)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
