"""Pretraining: the per-worker Ray Train loop of every method, and the checkpoint format.

The loop reads the ``train`` and ``heldout`` dataset shards Ray Train hands it, reports
``{"epoch", "train_loss", "images_per_second", "train_loss_steps"}`` once per epoch with a
checkpoint (``train_loss_steps``: rank 0's batch loss every ``log_every_steps`` steps), and adds
``upstream_accuracy`` to the last report (supervised: top-1 on the held-out source split; clip:
zero-shot top-1 there, against the classes' training captions; simclr: k-NN top-1 there, see
:mod:`trainers.methods`). It knows nothing of MLflow or of the study: whoever runs it turns reports into records.

``batch_size`` is the global batch: each of W workers takes ``batch_size // W`` per step, so a
run means the same optimization on 1 or N workers (contrastive losses gather the global batch).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from datasets_.pipeline import keep_batch_memory, normalize
from trainers.methods import (
    batch_caption_ids,
    build_pretrain_model,
    caption_class_embeddings,
    class_prompts,
    contrastive_loss,
    gather_ragged,
    knn_top1,
    nt_xent_loss,
    simclr_views,
    tokenize,
    zero_shot_logits,
)
from trainers.protocols import STEP_LOSSES

CHECKPOINT_FILE = "model.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run's loop needs. The plan builds it once; it crosses the Ray
    boundary as a dict (:meth:`to_dict`, Ray Train's ``train_loop_config``) and the loop rebuilds
    it (:meth:`from_dict`)."""

    method: str  # supervised | clip | simclr (trainers.methods)
    model_config: dict  # trainers.models.model_config(...)
    num_classes: int
    classes: tuple[str, ...]  # class names: CLIP's zero-shot prompts
    image_size: int
    epochs: int
    batch_size: int  # global: each of W workers takes batch_size // W
    lr: float  # AdamW peak learning rate
    weight_decay: float
    lr_schedule: str  # cosine | constant, after warmup_epochs
    warmup_epochs: float
    amp: str  # none | bf16 | fp16 (CUDA only)
    seed: int  # model init and data order
    num_train_samples: int  # samples the view selects (steps per epoch, the lr schedule)
    caption_noise: float = 0.0  # above 0: report realized_caption_noise each epoch
    log_every_steps: int = 10  # rank 0's batch loss every this many optimizer steps (STEP_LOSSES)
    head_weight_decay: float | None = None  # of the parameters outside the backbone; None: weight_decay
    meta: dict = field(default_factory=dict)  # stored in the checkpoint
    fault: dict | None = None  # test hook, see _maybe_inject_fault

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        return cls(**{**d, "classes": tuple(d["classes"])})

    def replace(self, **changes) -> PretrainConfig:
        return dataclasses.replace(self, **changes)


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


def load_model(directory: str) -> nn.Module:
    """Rebuild the pretrained model of a checkpoint directory, in eval mode on the CPU.

    The model has ``backbone`` (with named ``layers``), ``features`` and its method's heads;
    ``model.meta`` is the checkpoint's metadata (method, model_config, image_size, classes...).
    """
    state = load_checkpoint(directory)
    meta = state["meta"]
    model = build_pretrain_model(
        meta.get("method", "supervised"), meta["model_config"], meta["num_classes"], meta.get("image_size", 32)
    )
    model.load_state_dict(state["model"])
    model.meta = meta
    return model.eval()


def weights_digest(directory: str) -> str:
    """SHA-256 of a checkpoint's model weights (names, dtypes, shapes, bytes): the content
    address of everything computed from the model."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(load_checkpoint(directory)["model"].items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_meta(config: PretrainConfig) -> dict:
    """The metadata a run's checkpoint stores: what :func:`load_model` rebuilds the model from."""
    return {
        **config.meta,
        "method": config.method,
        "model_config": config.model_config,
        "num_classes": config.num_classes,
        "image_size": config.image_size,
    }


def is_head_parameter(name: str) -> bool:
    """Whether a pretraining model's parameter (named as in its ``named_parameters``) is outside
    the backbone: the supervised classifier head, SimCLR's projector, CLIP's projection and text
    tower. ``head_weight_decay`` applies to these."""
    return not name.startswith("backbone.")


def optimizer_groups(model: nn.Module, weight_decay: float, head_weight_decay: float | None) -> list[dict]:
    """AdamW parameter groups: one group at ``weight_decay``, or, with ``head_weight_decay`` set,
    the backbone's parameters at ``weight_decay`` and the head's (:func:`is_head_parameter`) at
    ``head_weight_decay``."""
    if head_weight_decay is None:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not is_head_parameter(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if is_head_parameter(n)], "weight_decay": head_weight_decay},
    ]


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


def amp_policy(device_type: str, amp: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether the loss needs a GradScaler) of an ``amp`` setting.

    Mixed precision runs on CUDA only. bf16 keeps float32's exponent range, so its gradients do
    not underflow and need no loss scaling; fp16 does. Parameters, optimizer state and the
    contrastive losses' similarity logits stay float32 (embeddings are cast back before the loss).
    """
    if device_type != "cuda" or amp == "none":
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, True
    raise ValueError(f"unknown amp mode '{amp}' (known: none, bf16, fp16)")


def _autocast(device: torch.device, amp: str):
    dtype, _ = amp_policy(device.type, amp)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


def _maybe_inject_fault(config: PretrainConfig, epoch: int, rank: int) -> None:
    """Test hook: ``fault={"epoch": e, "marker": path}`` kills rank 0's process once, in the
    middle of epoch ``e`` (the marker file records that it happened)."""
    fault = config.fault
    if not fault or rank != 0 or epoch != fault["epoch"] or os.path.exists(fault["marker"]):
        return
    with open(fault["marker"], "w") as f:
        f.write(f"killed in epoch {epoch}\n")
    os._exit(1)


def pretrain_loop(train_loop_config: dict) -> None:
    """Ray Train per-worker loop of every pretraining method: ``train_loop_config`` is a
    :class:`PretrainConfig` as a dict."""
    import ray.train
    import ray.train.torch

    keep_batch_memory()  # batches are normalized here, on CPU workers by the CPU
    config = PretrainConfig.from_dict(train_loop_config)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    method = config.method
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()
    amp = config.amp
    image_size = config.image_size

    model = build_pretrain_model(method, config.model_config, config.num_classes, image_size)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(optimizer_groups(bare, config.weight_decay, config.head_weight_decay), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_policy(device.type, amp)[1])
    meta = checkpoint_meta(config)

    start_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = load_checkpoint(d)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1

    step_loss = _step_functions(method, model, device, amp, config.seed + 7919 * rank)
    epochs = config.epochs
    batch_size = max(1, config.batch_size // world)  # per worker; batch_size is global
    steps_per_epoch = max(1, math.ceil(config.num_train_samples / world / batch_size))
    train_shard = ray.train.get_dataset_shard("train")
    heldout_shard = ray.train.get_dataset_shard("heldout")

    for epoch in range(start_epoch, epochs):
        model.train()
        loss_sum, seen, step, swapped, t0 = 0.0, 0, 0, 0, time.perf_counter()
        step_losses = []  # [global optimizer step, batch loss]: reported with the epoch, not each step
        # The shard iterator is one-shot: make a new one every epoch.
        for batch in train_shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=max(1024, 4 * batch_size),
            local_shuffle_seed=config.seed * 1000 + epoch,
            prefetch_batches=2,
        ):
            lr = lr_at(epoch + step / steps_per_epoch, config.lr, epochs, config.warmup_epochs, config.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, amp):
                loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = len(batch["label"])
            if "caption_swapped" in batch:
                swapped += int(batch["caption_swapped"].sum())
            loss_sum += float(loss.detach()) * n
            seen += n
            step += 1
            # Counted from the epoch's planned start, so a resumed run numbers its steps as before.
            global_step = epoch * steps_per_epoch + step
            if global_step % config.log_every_steps == 0:
                step_losses.append([global_step, float(loss.detach())])
            if step == max(1, steps_per_epoch // 2):
                _maybe_inject_fault(config, epoch, rank)
        elapsed = time.perf_counter() - t0
        loss_sum, seen, elapsed_sum, swapped = _all_reduce_sum([loss_sum, seen, elapsed, swapped], device)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "images_per_second": seen / max(elapsed_sum / world, 1e-9),
            STEP_LOSSES: step_losses,
        }
        if config.caption_noise > 0:  # share of this epoch's captions that were another sample's
            metrics["realized_caption_noise"] = swapped / max(seen, 1)
        if epoch == epochs - 1:
            correct, total = upstream_top1(
                method,
                bare,
                lambda: train_shard.iter_torch_batches(batch_size=256),
                lambda: heldout_shard.iter_torch_batches(batch_size=256),
                device,
                amp,
                config,
            )
            correct, total = _all_reduce_sum([correct, total], device)
            metrics["upstream_accuracy"] = correct / max(total, 1)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_checkpoint(d, bare, meta, optimizer, epoch)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _step_functions(method: str, model: nn.Module, device, amp: str, seed: int):
    """The per-batch loss of a method: ``batch -> scalar loss`` (forward pass included)."""
    if method == "supervised":
        ce = nn.CrossEntropyLoss()
        return lambda b: ce(
            model(normalize(b["image"].to(device, non_blocking=True))), b["label"].to(device, non_blocking=True)
        )
    if method == "clip":

        def clip_step(b):
            images = normalize(b["image"].to(device, non_blocking=True))
            tokens = b["tokens"].to(device, non_blocking=True)
            image_f, text_f, scale = model(images, tokens)
            with torch.autocast(device.type, enabled=False):  # similarity logits in float32
                return contrastive_loss(image_f.float(), text_f.float(), scale.float(), batch_caption_ids(tokens))

        return clip_step
    if method == "simclr":
        generator = torch.Generator().manual_seed(seed)

        def simclr_step(b):
            images = normalize(b["image"].to(device, non_blocking=True))
            views = torch.cat([simclr_views(images, generator), simclr_views(images, generator)])
            z = model(views)  # one forward for both views (DDP allows one per backward)
            z1, z2 = z.float().chunk(2)
            with torch.autocast(device.type, enabled=False):  # similarity logits in float32
                return nt_xent_loss(z1, z2)

        return simclr_step
    raise ValueError(f"unknown pretraining method '{method}'")


@torch.no_grad()
def clip_class_embeddings(model: nn.Module, train_batches, config: PretrainConfig) -> torch.Tensor:
    """:func:`~trainers.methods.caption_class_embeddings` of every worker's training captions
    (``train_batches``: an iterable of this worker's ``{"tokens", "label"}`` batches)."""
    tokens, labels = [], []
    for batch in train_batches:
        tokens.append(batch["tokens"])
        labels.append(batch["label"])
    # Every rank joins the gathers, even one whose shard happened to be empty.
    width = model.text.context_length
    tokens = gather_ragged(torch.cat(tokens) if tokens else torch.zeros(0, width, dtype=torch.long))
    labels = gather_ragged(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    return caption_class_embeddings(model, tokens, labels, tokenize(class_prompts(list(config.classes))))


@torch.no_grad()
def upstream_top1(
    method: str, model: nn.Module, train_batches, heldout_batches, device, amp: str, config: PretrainConfig
) -> tuple[int, int]:
    """(correct, total) of this worker's held-out data under the method's upstream measure.

    ``train_batches()`` and ``heldout_batches()`` each return a fresh iterable of
    ``{"image": uint8, "label"}`` torch batches: this worker's shards of the training view (the
    k-NN memory bank of simclr) and of the held-out split.
    """
    model.eval()
    heldout = heldout_batches()
    if method == "supervised":
        return evaluate_top1(model, heldout, device, amp)
    if method == "clip":
        classes = clip_class_embeddings(model, train_batches(), config)
        correct = total = 0
        for batch in heldout:
            with _autocast(device, amp):
                logits = zero_shot_logits(model, normalize(batch["image"].to(device)), classes)
            correct += int((logits.argmax(1) == batch["label"].to(device)).sum())
            total += int(batch["label"].numel())
        return correct, total
    # simclr: the memory bank is every worker's training features (un-augmented)
    feats, labels = [], []
    for batch in train_batches():
        with _autocast(device, amp):
            feats.append(model.features(normalize(batch["image"].to(device))).float())
        labels.append(batch["label"].to(device))
    # Every rank joins the gathers, even one whose shard happened to be empty.
    bank_x = gather_ragged(torch.cat(feats) if feats else torch.zeros(0, model.feature_dim, device=device))
    bank_y = gather_ragged(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))
    test_x, test_y = [], []
    for batch in heldout:
        with _autocast(device, amp):
            test_x.append(model.features(normalize(batch["image"].to(device))).float())
        test_y.append(batch["label"].to(device))
    if not test_x or bank_x.shape[0] == 0:
        return 0, sum(int(t.numel()) for t in test_y)
    return knn_top1(bank_x, bank_y, torch.cat(test_x), torch.cat(test_y), config.num_classes)
