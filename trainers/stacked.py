"""Datamodel batches: B small supervised models, each on its own class subset, trained at once.

Jain et al.'s datamodels need hundreds to thousands of small models, each pretrained on a random
subset of the source's classes and evaluated on one target task. One process trains B of them as
one stacked model: :func:`torch.func.stack_module_state` stacks their parameters (and BatchNorm
buffers) along a new leading dimension, and :func:`torch.func.vmap` over
:func:`torch.func.functional_call` runs the B forward/backward passes as one batched computation.

**Each model sees only its own subset, as if trained alone.** Every model has its own index
stream (:func:`index_stream`): the samples of its kept classes, reshuffled every epoch from its
own seed, cut into full batches of ``batch_size``. At step t model b reads rows ``stream_b[t]``,
so the stacked step gathers a [B, batch_size] block of *different* samples — no masking of a
shared batch (which would waste (1 − α) of the compute, give each model a random effective batch
size and put excluded classes into BatchNorm's batch statistics). Models whose subset is smaller
run fewer steps: past its last step a model's parameters, optimizer state and BatchNorm buffers
are frozen (``torch.where`` on an ``active`` mask), so it ends exactly where a run of its own
steps would. AdamW is written out on the stacked tensors, the same update as ``torch.optim.AdamW``
(a test checks one stacked model against a plain loop with ``torch.optim.AdamW``), with the
learning rate of :func:`trainers.pretrain.lr_at` per model. A model's result therefore does not
depend on B or on which models share its batch (up to float rounding of batched kernels).

Knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from datasets_.pipeline import normalize
from datasets_.views import validation_mask
from trainers.features import Features
from trainers.models import build_model
from trainers.pretrain import is_head_parameter, lr_at
from trainers.probe import logistic_probe, ridge_few_shot
from trainers.protocols import FROZEN_PROTOCOLS

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as in trainers.pretrain


@dataclass(frozen=True)
class TrainSettings:
    """The pretraining settings a datamodel batch uses (a subset of orchestrator.spec.PretrainSettings)."""

    image_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    head_weight_decay: float | None = None  # of the parameters outside the backbone; None: weight_decay


def index_stream(
    order: np.ndarray, labels: np.ndarray, kept: np.ndarray, batch_size: int, epochs: int, seed: int
) -> np.ndarray:
    """A model's training rows, [steps, batch_size]: its kept classes' samples, reshuffled each epoch.

    ``order`` lists the rows sorted by sample key, so the stream depends on keys and ``seed`` only,
    not on file order (:func:`row_stream` of those rows).
    """
    rows = order[np.isin(labels[order], np.flatnonzero(kept))]
    if len(rows) == 0:
        raise ValueError("a model's class subset has no training sample")
    return row_stream(rows, batch_size, epochs, seed)


def row_stream(rows: np.ndarray, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """``rows`` (a model's training rows, in sample-key order) reshuffled each epoch from ``seed``,
    [steps, batch_size]: steps = ceil(epochs · n / batch_size); the last batch wraps into a fresh
    shuffle, so every batch is full (one more partial epoch at most)."""
    steps = math.ceil(epochs * len(rows) / batch_size)
    need, parts, epoch = steps * batch_size, [], 0
    while sum(len(p) for p in parts) < need:
        parts.append(rows[np.random.default_rng([seed, epoch]).permutation(len(rows))])
        epoch += 1
    return np.concatenate(parts)[:need].reshape(steps, batch_size)


@dataclass
class StackedModels:
    base: nn.Module  # a model on the meta device: the architecture functional_call runs
    params: dict[str, torch.Tensor]  # name -> [B, ...]
    buffers: dict[str, torch.Tensor]  # name -> [B, ...] (BatchNorm running statistics)
    train_loss: np.ndarray  # [B] mean loss over each model's last epoch of steps
    num_train_samples: np.ndarray  # [B]

    def model(self, b: int, num_classes: int, model_config: dict, image_size: int) -> nn.Module:
        """Model b as an ordinary module (for checks and for saving)."""
        m = build_model(model_config, num_classes, image_size)
        m.load_state_dict(member_state(self.params, self.buffers, b))
        return m.eval()


def member_state(params: dict, buffers: dict, b: int) -> dict[str, torch.Tensor]:
    """Model b's parameters and buffers out of stacked ones, named as its module's ``state_dict``."""
    return {**{k: v[b] for k, v in params.items()}, **{k: v[b] for k, v in buffers.items()}}


def _init_models(model_config: dict, num_classes: int, image_size: int, seeds: list[int]) -> list[nn.Module]:
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(build_model(model_config, num_classes, image_size))
    return models


def _adamw(p, g, m, v, t, lr, wd, active):
    """One AdamW step on stacked tensors; ``t``, ``lr``, ``wd``, ``active`` are per model [B]."""
    shape = (-1,) + (1,) * (p.dim() - 1)
    act, lr_, tt = active.view(shape), lr.to(p.dtype).view(shape), t.to(p.dtype).view(shape)
    wd_ = wd.to(p.dtype).view(shape)
    m_new = BETAS[0] * m + (1 - BETAS[0]) * g
    v_new = BETAS[1] * v + (1 - BETAS[1]) * g * g
    step_size = lr_ / (1 - BETAS[0] ** tt)
    denom = (v_new / (1 - BETAS[1] ** tt)).sqrt() + EPS
    p_new = p * (1 - lr_ * wd_) - step_size * m_new / denom
    return torch.where(act, p_new, p), torch.where(act, m_new, m), torch.where(act, v_new, v)


def epoch_of_steps(steps: int, epochs: int) -> np.ndarray:
    """The epoch (0..epochs-1) each of a model's ``steps`` steps belongs to: step t is in epoch
    floor(t · epochs / steps), as the learning-rate schedule counts it."""
    return np.minimum(np.arange(steps) * epochs // steps, epochs - 1)


def vectorize_default(device: torch.device) -> bool:
    """Whether :func:`run_stacked` vmaps the models' steps on ``device``: on an accelerator, yes
    (one batched kernel where B small ones would leave it idle); on the CPU, no (each model's step
    in turn, its images channels-last, is 2.0-2.6x faster there than the vmapped step, measured on
    2 cores: docs/benchmarks.md "On the CPU: each model's step in turn").
    ``TRANSFERLAB_STACKED_VMAP=1`` / ``0`` overrides."""
    forced = os.environ.get("TRANSFERLAB_STACKED_VMAP", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return device.type != "cpu"


def _looped_step(step_one):
    """The per-model counterpart of ``vmap(step_one)``: each active model's gradient and loss in
    turn, on views of the stacked tensors (so BatchNorm updates its own slice of the stacked
    buffers in place, as under vmap); a model past its last step gets zero gradients and loss 0
    (the update ignores both). A model's images (4-D inputs) go to it channels-last: its
    convolutions run 1.2-1.5x faster that way on the CPU (small-cnn at 28 px and tiny-cnn at
    8-16 px, batch 64, one thread), with the same result up to float rounding."""

    def own(x: torch.Tensor, b: int) -> torch.Tensor:
        return x[b].contiguous(memory_format=torch.channels_last) if x.dim() == 5 else x[b]

    def step(params, buffers, *inputs, active: np.ndarray):
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        losses = torch.zeros(len(active), device=next(iter(params.values())).device)
        for b in np.flatnonzero(active):
            own_params, own_buffers = {k: v[b] for k, v in params.items()}, {k: v[b] for k, v in buffers.items()}
            g, loss = step_one(own_params, own_buffers, *(own(x, b) for x in inputs))
            for k, v in g.items():
                grads[k][b] = v
            losses[b] = loss.detach()
        return grads, losses

    return step


def run_stacked(
    models: list[nn.Module],
    streams: list[np.ndarray],
    settings: list[TrainSettings],
    loss_fn,
    batch_inputs,
    device: torch.device,
    on_epoch=None,
    on_step=None,
    vectorize: bool | None = None,
) -> tuple[nn.Module, dict, dict, list[np.ndarray]]:
    """Train ``models`` (same architecture) stacked: model b on ``streams[b]`` ([steps_b,
    batch_size] rows) with AdamW and the lr schedule, weight decay (its head's:
    :func:`trainers.pretrain.is_head_parameter`) and epochs of ``settings[b]``; past its last step
    it is frozen (parameters, optimizer state, BatchNorm buffers).

    ``batch_inputs(rows)`` turns a [B, batch_size] row tensor into the per-model batched inputs
    of ``loss_fn(base, params, buffers, *inputs) -> scalar loss`` (vmapped over models).
    ``on_epoch(b, epoch, mean_loss, steps_done)``, if given, is called as model b ends an epoch;
    ``on_step(t, losses, active)``, if given, after step t with every model's batch loss [B] and
    which models took the step (before any ``on_epoch`` of that step).
    ``vectorize``: vmap the B steps into one (None: :func:`vectorize_default` for ``device``) or
    run them one model after another; the result is the same up to float rounding.
    Returns (base on the meta device, stacked params, stacked buffers, per-model epoch losses).
    """
    B = len(models)
    steps = np.array([len(x) for x in streams])
    epochs = np.array([s.epochs for s in settings])
    epoch_of = [epoch_of_steps(int(n), int(e)) for n, e in zip(steps, epochs)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    base = copy.deepcopy(models[0]).to("meta").train()
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    body_wd = [s.weight_decay for s in settings]
    head_wd = [s.weight_decay if s.head_weight_decay is None else s.head_weight_decay for s in settings]
    wd = {k: torch.tensor(head_wd if is_head_parameter(k) else body_wd, device=device) for k in params}
    step_one = grad_and_value(lambda p, buf, *x: loss_fn(base, p, buf, *x))
    if vectorize is None:
        vectorize = vectorize_default(torch.device(device))
    if vectorize:
        vmapped = vmap(step_one)

        def step_grad(params, buffers, *inputs, active):
            return vmapped(params, buffers, *inputs)
    else:
        step_grad = _looped_step(step_one)
    losses = [np.zeros(int(e)) for e in epochs]
    counts = [np.zeros(int(e)) for e in epochs]
    for t in range(int(steps.max())):
        active_np = t < steps
        last = np.minimum(t, steps - 1)
        rows = torch.from_numpy(np.stack([streams[b][last[b]] for b in range(B)])).to(device)
        old_buffers = {k: b.clone() for k, b in buffers.items()}
        # updates BatchNorm buffers in place
        grads, loss = step_grad(params, buffers, *batch_inputs(rows), active=active_np)
        active = torch.from_numpy(active_np).to(device)
        lr = torch.tensor(
            [
                lr_at(t * s.epochs / steps[b], s.lr, s.epochs, s.warmup_epochs, s.lr_schedule)
                for b, s in enumerate(settings)
            ],
            device=device,
        )
        tt = torch.from_numpy(last + 1.0).to(device)
        for k in params:
            params[k], m[k], v2[k] = _adamw(params[k], grads[k], m[k], v2[k], tt, lr, wd[k], active)
        for k, b in buffers.items():  # a finished model's BatchNorm statistics stay as they were
            buffers[k].copy_(torch.where(active.view((-1,) + (1,) * (b.dim() - 1)), b, old_buffers[k]))
        loss_np = loss.detach().cpu().numpy()
        if on_step is not None:
            on_step(t, loss_np, active_np)
        for b in np.flatnonzero(active_np):
            e = epoch_of[b][t]
            losses[b][e] += loss_np[b]
            counts[b][e] += 1
            if on_epoch is not None and (t + 1 == steps[b] or epoch_of[b][t + 1] != e):
                on_epoch(int(b), int(e), float(losses[b][e] / counts[b][e]), t + 1)
    return base, params, buffers, [lo / np.maximum(c, 1) for lo, c in zip(losses, counts)]


def train_stacked(
    model_config: dict,
    num_classes: int,
    images: torch.Tensor,
    labels: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    seeds: list[int],
    s: TrainSettings,
    device: torch.device | str | None = None,
    vectorize: bool | None = None,
) -> StackedModels:
    """Train len(seeds) supervised models at once on ``device`` (default CPU); model b on the
    classes ``masks[b]`` holds.

    ``images``: uint8 [N, 3, S, S] of the source's training split (moved to ``device`` once, as
    uint8); ``labels`` [N]; ``keys`` [N]. Model b's initialization and its data order both come
    from ``seeds[b]``; they are drawn on the CPU, so a model starts the same on every device.
    """
    device = torch.device(device or "cpu")
    B = len(seeds)
    order = np.argsort(keys, kind="stable")
    streams = [index_stream(order, labels, masks[b], s.batch_size, s.epochs, seeds[b]) for b in range(B)]
    models = _init_models(model_config, num_classes, s.image_size, seeds)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    images = images.to(device)

    def loss_fn(base, p, buf, x, y):
        return nn.functional.cross_entropy(functional_call(base, (p, buf), (normalize(x),)), y)

    base, params, buffers, epoch_loss = run_stacked(
        models, streams, [s] * B, loss_fn, lambda rows: (images[rows], y_all[rows]), device, vectorize=vectorize
    )
    n_samples = np.array([int(np.isin(labels, np.flatnonzero(mk)).sum()) for mk in masks])
    return StackedModels(base, params, buffers, np.array([e[-1] for e in epoch_loss]), n_samples)


@torch.no_grad()
def stacked_features(sm: StackedModels, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Final backbone features of every model on shared images (uint8 [N, 3, S, S], normalized
    batch by batch on the models' device): [B, N, D]."""
    backbone = sm.base.backbone.eval()

    def strip(d):
        return {k[len("backbone.") :]: v for k, v in d.items() if k.startswith("backbone.")}

    p, b = strip(sm.params), strip(sm.buffers)
    run = vmap(lambda pp, bb, x: functional_call(backbone, (pp, bb), (x,)), in_dims=(0, 0, None))
    device = next(iter(sm.params.values())).device
    out = [
        run(p, b, normalize(images[i : i + batch_size].to(device))).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    sm.base.train()
    return torch.cat(out, dim=1).numpy()


@torch.no_grad()
def stacked_upstream_accuracy(
    sm: StackedModels, images: torch.Tensor, labels: np.ndarray, masks: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Each model's top-1 accuracy on the held-out source ``images`` (uint8 [N, 3, S, S]) of the
    classes it trained on (``masks[b]``), its prediction the argmax over all source classes, as a
    packed or TorchTrainer pretraining run measures ``upstream_accuracy`` on its view: [B], NaN
    for a model none of whose classes has a held-out sample."""
    device = next(iter(sm.params.values())).device
    run = vmap(lambda pp, bb, x: functional_call(sm.base, (pp, bb), (x,)), in_dims=(0, 0, None))
    sm.base.eval()
    pred = torch.cat(
        [
            run(sm.params, sm.buffers, normalize(images[i : i + batch_size].to(device))).argmax(-1).cpu()
            for i in range(0, len(images), batch_size)
        ],
        dim=1,
    ).numpy()  # [B, N]
    sm.base.train()
    y = np.asarray(labels)
    kept = np.asarray(masks, dtype=bool)[:, y]  # [B, N]: the sample's class is one the model trained on
    correct = ((pred == y[None, :]) & kept).sum(1)
    total = kept.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / total, np.nan)


def probe_outputs(
    train: Features, test: Features, num_classes: int, protocol: str, shots, seed: int, val_fraction: float
) -> tuple[float, pd.DataFrame]:
    """(accuracy on ``test``, per-example outputs on ``test``) of one frozen-feature probe, chosen
    as :func:`trainers.transfer.evaluate_transfer` does (validation carve-out of ``train`` by key
    hash, shots from the rest); ``test`` is only scored (a datamodel sweep passes its influence
    holdout)."""
    from trainers.transfer import per_example, shot_indices

    val = validation_mask(train.keys, val_fraction)
    pool = np.flatnonzero(~val)
    idx = pool[shot_indices(train.keys[pool], train.y[pool], shots, seed, num_classes)]
    if protocol == "linear_probe":
        scores = ridge_few_shot(
            train.x[idx], train.y[idx], train.x[val], train.y[val], test.x, test.y, num_classes
        ).scores
    elif protocol == "logistic":
        scores = logistic_probe(train.x[idx], train.y[idx], train.x[val], train.y[val], test.x, num_classes).scores
    else:
        raise ValueError(f"unknown datamodel protocol '{protocol}' (known: {', '.join(FROZEN_PROTOCOLS)})")
    out = per_example(test.keys, test.y, scores)
    return float((out["prediction"] == out["label"]).mean()), out
