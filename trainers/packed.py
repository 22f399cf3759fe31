"""Packed pretraining: several small pretraining runs of one architecture trained at once.

A TorchTrainer costs seconds of start-up and its own worker processes whatever the model; the
small CNNs of most studies train in less. A *pack* trains B runs in one process as one stacked
model, with the machinery of :mod:`trainers.stacked` (``torch.func`` stacking, vmapped
gradients, AdamW written out per model, finished models frozen).

**Each run trains exactly as if alone.** Run b has its own data stream: the rows its view keeps
(:meth:`datasets_.views.PretrainView.apply` on the whole training split: size subset, class
filter), with its view's noisy labels, sorted by sample key and reshuffled every epoch from its
seed, in full batches (:func:`trainers.stacked.row_stream`). It has its own initialization
(``torch.manual_seed(seed)``, as :func:`trainers.pretrain.pretrain_loop`), learning rate, weight
decay (the head's apart when ``head_weight_decay`` is set), schedule, warm-up and epochs; simclr
augments each run's batch with its own seeded generator, outside the vmapped step. A clip run
stacks its image and text towers and its logit scale like any parameters; its captions are its
own (:func:`datasets_.pipeline.training_captions` of the split's captions, its class prompts by
its view's labels), tokenized once, and each step gathers its own batch's token rows and caption
ids (:func:`caption_ids`: equal ids, identical token rows, as
:func:`trainers.methods.batch_caption_ids` numbers a batch), so its
:func:`~trainers.methods.contrastive_loss` sees the positives a run alone would. So a run's
weights do not depend on B nor on its packmates (up to float rounding of batched kernels; tests
check both and a plain ``torch.optim.AdamW`` loop).

What may differ within a pack: everything of the view (pretrain_size, label_noise, seed, class
subset) and of the optimizer (lr, weight_decay, head_weight_decay, epochs, lr_schedule,
warmup_epochs). What must
be equal (:func:`pack_key`): method, model, num_classes, image_size, batch_size, amp. Packed
methods: all three (:data:`PACKABLE_METHODS`); a clip run with ``caption_noise`` keeps its
TorchTrainer (its swaps are drawn per decoded batch there). Mixed precision is not used in a
pack (``amp`` must be ``none``).

The data order differs from a TorchTrainer run of the same configuration (Ray Data's seeded
shuffle buffer there, a full per-epoch permutation here), as a run on another worker count
would; the configuration, and so its content hash, is the same.

Knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from datasets_.pipeline import normalize, training_captions
from datasets_.views import PretrainView
from trainers.methods import (
    build_pretrain_model,
    class_prompts,
    contrastive_loss,
    nt_xent_loss,
    simclr_views,
    tokenize,
)
from trainers.pretrain import PretrainConfig, checkpoint_meta, upstream_top1
from trainers.protocols import STEP_LOSSES
from trainers.stacked import TrainSettings, member_state, row_stream, run_stacked

PACKABLE_METHODS = ("supervised", "simclr", "clip")
EVAL_BATCH = 256


@dataclass(frozen=True)
class DecodedSplit:
    """A split held in memory (:func:`datasets_.pipeline.decode_split`)."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: np.ndarray  # int64 [N]
    keys: np.ndarray  # str [N]
    captions: list | None = None  # str or None per sample (clip's text); None: no captions read


@dataclass
class PackedResult:
    """One run of a pack, trained."""

    model: nn.Module  # as trainers.methods.build_pretrain_model builds it; eval mode, on the CPU
    meta: dict  # the checkpoint's metadata (trainers.pretrain.checkpoint_meta)
    epoch_loss: np.ndarray  # [epochs] mean training loss of each epoch
    upstream_accuracy: float  # the method's upstream measure, as trainers.pretrain.upstream_top1
    num_train_samples: int  # rows its view keeps


def pack_key(config: PretrainConfig) -> tuple:
    """What runs trained in one pack must share (their parameter shapes and batch)."""
    return (
        config.method,
        json.dumps(config.model_config, sort_keys=True),
        config.num_classes,
        config.image_size,
        config.batch_size,
        config.amp,
    )


def parameter_count(config: PretrainConfig) -> int:
    """Parameters of a run's model (on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = build_pretrain_model(config.method, config.model_config, config.num_classes, config.image_size)
    return sum(p.numel() for p in model.parameters())


def _settings(c: PretrainConfig) -> TrainSettings:
    return TrainSettings(
        c.image_size, c.epochs, c.batch_size, c.lr, c.weight_decay, c.lr_schedule, c.warmup_epochs, c.head_weight_decay
    )


def _check(configs: list[PretrainConfig]) -> None:
    keys = {pack_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError(
            f"a pack's runs must share method, model, classes, image and batch size; got {len(keys)} kinds"
        )
    if configs[0].method not in PACKABLE_METHODS:
        raise ValueError(f"method '{configs[0].method}' is not packed (packed: {', '.join(PACKABLE_METHODS)})")
    if configs[0].amp != "none":
        raise ValueError("packed runs train in float32 (amp: none)")
    if any(c.caption_noise > 0 for c in configs):
        raise ValueError("clip runs with caption_noise are not packed (their swaps are drawn per decoded batch)")


def _view_rows(split: DecodedSplit, view: PretrainView | None) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows in sample-key order, training labels of every row) of a view."""
    order = np.argsort(split.keys, kind="stable")
    if view is None:
        return order, np.asarray(split.labels, dtype=np.int64)
    keep, labels = view.apply(list(split.keys), np.asarray(split.labels, dtype=np.int64))
    return order[keep[order]], np.asarray(labels, dtype=np.int64)


def _batches(images: torch.Tensor, labels: np.ndarray, rows: np.ndarray, tokens=None) -> Callable:
    def it():
        for i in range(0, len(rows), EVAL_BATCH):
            r = rows[i : i + EVAL_BATCH]
            batch = {"image": images[r], "label": torch.from_numpy(labels[r])}
            if tokens is not None:
                batch["tokens"] = tokens[r]
            yield batch

    return it


def run_tokens(split: DecodedSplit, labels: np.ndarray, classes: tuple[str, ...]) -> torch.Tensor:
    """int64 [N, context]: the tokenized text a clip run trains on for every sample of ``split``:
    its caption, or its class prompt by ``labels`` (the run's view labels) where it has none,
    as a TorchTrainer run's batches carry them (:func:`trainers.methods.clip_text_input`)."""
    texts, _ = training_captions(split.keys, split.captions, labels, class_prompts(list(classes)), None)
    distinct, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return tokenize(list(distinct))[torch.from_numpy(index.reshape(-1))]


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """int64 [N]: one id per distinct token row; equal ids, identical rows. Within any batch of a
    run's rows these ids pair samples exactly as :func:`trainers.methods.batch_caption_ids` does."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def _step_inputs(method: str, images, labels, seeds: list[int], tokens=None):
    """(loss_fn, batch_inputs) of :func:`trainers.stacked.run_stacked` for a method (``tokens``:
    clip's [B, N, context] token rows of every run)."""
    if method == "supervised":

        def supervised(base, p, buf, x, y):
            return nn.functional.cross_entropy(functional_call(base, (p, buf), (normalize(x),)), y)

        return supervised, lambda rows: (images[rows], labels.gather(1, rows))
    if method == "clip":
        ids = torch.stack([caption_ids(t) for t in tokens])
        runs = torch.arange(len(tokens), device=tokens.device)[:, None]

        def clip(base, p, buf, x, t, i):
            image_f, text_f, scale = functional_call(base, (p, buf), (normalize(x), t))
            return contrastive_loss(image_f, text_f, scale, i)

        return clip, lambda rows: (images[rows], tokens[runs, rows], ids.gather(1, rows))
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def views(rows):  # each run's two augmented views, from its own generator
        out = []
        for b, g in enumerate(generators):
            x = normalize(images[rows[b]])
            out.append(torch.cat([simclr_views(x, g), simclr_views(x, g)]))
        return (torch.stack(out),)

    def simclr(base, p, buf, v):
        z1, z2 = functional_call(base, (p, buf), (v,)).chunk(2)
        return nt_xent_loss(z1, z2)

    return simclr, views


def train_packed(
    configs: list[PretrainConfig],
    views: list[PretrainView | None],
    heldout_views: list[PretrainView | None],
    train: DecodedSplit,
    heldout: DecodedSplit,
    device: torch.device | str | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    vectorize: bool | None = None,
) -> list[PackedResult]:
    """Train the runs ``configs[b]`` on ``views[b]`` of ``train`` at once on ``device`` (default
    CPU); measure each one's upstream accuracy on ``heldout`` under ``heldout_views[b]``.

    ``on_epoch(b, metrics)`` receives run b's ``{"epoch", "train_loss", "images_per_second",
    STEP_LOSSES}`` as it ends each epoch (images_per_second: what the whole pack processed per
    second so far; STEP_LOSSES: its ``[step, batch loss]`` every ``log_every_steps`` steps of the
    epoch, numbered from its first step as a TorchTrainer run numbers them).
    ``vectorize``: vmap the runs' steps into one, or run them in turn
    (:func:`trainers.stacked.vectorize_default`: vmap on an accelerator, in turn on the CPU).
    """
    _check(configs)
    device = torch.device(device or "cpu")
    method, c0 = configs[0].method, configs[0]
    rows, labels = zip(*(_view_rows(train, v) for v in views))
    for c, r in zip(configs, rows):
        if len(r) == 0:
            raise ValueError(f"run {c.meta.get('config_hash', c.seed)}: its view keeps no training sample")
    streams = [row_stream(r, c.batch_size, c.epochs, c.seed) for r, c in zip(rows, configs)]
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_pretrain_model(method, c.model_config, c.num_classes, c.image_size))
    images = train.images.to(device)
    y = torch.from_numpy(np.stack(labels)).to(device)
    tokens = None
    if method == "clip":
        tokens = torch.stack([run_tokens(train, lab, c.classes) for lab, c in zip(labels, configs)]).to(device)
    loss_fn, inputs = _step_inputs(method, images, y, [c.seed for c in configs], tokens)
    t0, per_step = time.perf_counter(), len(configs) * c0.batch_size
    step_losses: list[list] = [[] for _ in configs]  # each run's [step, loss] of the epoch so far

    def step(t, losses, active):
        for b in np.flatnonzero(active):
            if (t + 1) % configs[b].log_every_steps == 0:
                step_losses[b].append([t + 1, float(losses[b])])

    def report(b, epoch, loss, steps_done):
        if on_epoch is not None:
            rate = steps_done * per_step / max(time.perf_counter() - t0, 1e-9)
            on_epoch(b, {"epoch": epoch, "train_loss": loss, "images_per_second": rate, STEP_LOSSES: step_losses[b]})
        step_losses[b] = []

    _, params, buffers, epoch_loss = run_stacked(
        models, streams, [_settings(c) for c in configs], loss_fn, inputs, device, report, step, vectorize
    )
    out = []
    for b, c in enumerate(configs):
        model = models[b]
        saved = model.state_dict().keys()  # not the non-persistent buffers (clip's attention mask)
        model.load_state_dict({k: v for k, v in member_state(params, buffers, b).items() if k in saved})
        model.to(device)
        held_rows, held_labels = _view_rows(heldout, heldout_views[b])
        correct, total = upstream_top1(
            method,
            model,
            _batches(train.images, labels[b], rows[b], None if tokens is None else tokens[b].cpu()),
            _batches(heldout.images, held_labels, held_rows),
            device,
            "none",
            c,
        )
        out.append(
            PackedResult(model.cpu().eval(), checkpoint_meta(c), epoch_loss[b], correct / max(total, 1), len(rows[b]))
        )
    return out
