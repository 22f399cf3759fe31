"""Transfer evaluation of a pretrained checkpoint on a downstream task, by every protocol.

One call of :func:`evaluate_transfer` handles every fit of one (checkpoint, task): frozen
features are extracted once per layer (or read from the :class:`~trainers.features.FeatureCache`)
and shared by every linear_probe / logistic fit of every shots × seed; fine-tuning fits decode the
task's images once. The task's train split is divided, by key hash, into a validation part
(chooses hyperparameters: the probes' L2 strength, the fine-tuning learning rate) and a pool the
shots are drawn from; the test split is only ever scored. A hyperparameter search trains one
fine-tuning config at a time on a :class:`FinetuneProblem` (the same inputs, the same loop:
:func:`train_finetune`).

Protocols:
- ``linear_probe``: closed-form ridge few-shot probe (:func:`trainers.probe.ridge_few_shot`).
- ``logistic``: L-BFGS multinomial logistic regression (:func:`trainers.probe.logistic_probe`).
- ``finetune``: the whole network and a new linear head trained on the shots (AdamW).
- ``lp_ft``: a logistic probe first, then fine-tuning of everything from that head.
- ``zero_shot``: CLIP checkpoints only; class-name prompts, no training examples.

Each fit returns its metrics and a per-test-example table (``example, key, label, prediction,
correct_prob, margin``); ``correct_prob`` is the softmax probability of the true class under the
fit's scores (for the ridge probe: the softmax of its regression scores).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from datasets_.pipeline import iter_local_batches, normalize
from datasets_.shards import ShardedDataset
from datasets_.views import few_shot_indices, validation_mask
from trainers.features import FeatureCache, Features, feature_key
from trainers.probe import logistic_probe, mean_per_class_accuracy, ridge_few_shot
from trainers.protocols import FINAL_LAYER, FROZEN_PROTOCOLS, FULL

HEAD_LR_MULTIPLIER = 10.0


@dataclass(frozen=True)
class FinetuneSettings:
    """Full fine-tuning: ``steps`` AdamW steps of ``batch_size`` examples (sampled from the
    shots, reshuffled each pass), for each learning rate in ``lr`` (chosen on validation)."""

    lr: tuple[float, ...] = (1e-3, 1e-2)
    steps: int = 100
    batch_size: int = 32
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class TransferConfig:
    """What every fit of one (checkpoint, task) shares; the plan builds it once per group."""

    image_size: int | None = None  # None: the checkpoint's own
    val_fraction: float = 0.2  # of the task's train split, held out (by key hash) to choose L2 / the lr
    finetune: FinetuneSettings = FinetuneSettings()


@dataclass(frozen=True)
class Fit:
    protocol: str
    shots: int | str  # examples per class, 'full', or 0 (zero_shot)
    seed: int
    layer: str = FINAL_LAYER


@dataclass
class FitResult:
    metrics: dict
    outputs: pd.DataFrame


@dataclass
class TransferStats:
    feature_extractions: int = 0  # (layer) feature sets computed from images
    feature_cache_hits: int = 0  # (layer) feature sets read from the cache
    per_fit: list = field(default_factory=list)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def extract_layers(
    model, dataset: ShardedDataset, split: str, image_size: int, layers: list[str], batch_size: int = 256
) -> dict[str, Features]:
    """Features of several named layers of ``model.backbone`` from one pass over a split, on
    the model's device."""
    keys, ys = [], []
    xs: dict[str, list] = {name: [] for name in layers}
    device = _device(model)
    for batch in iter_local_batches(dataset, split, image_size, batch_size):
        out = model.backbone.layers(torch.from_numpy(batch["image"]).to(device, non_blocking=True), layers)
        for name in layers:
            xs[name].append(out[name].float().cpu().numpy())
        keys.append(batch["key"])
        ys.append(batch["label"])
    k = np.concatenate(keys).astype(str)
    y = np.concatenate(ys)
    return {name: Features(k, np.concatenate(xs[name]).astype(np.float64), y) for name in layers}


def extract_features(model, dataset: ShardedDataset, split: str, image_size: int, batch_size: int = 256) -> Features:
    """Final-layer features of a split (see :func:`extract_layers`)."""
    return extract_layers(model, dataset, split, image_size, [FINAL_LAYER], batch_size)[FINAL_LAYER]


def shot_indices(keys: np.ndarray, labels: np.ndarray, shots, seed: int, num_classes: int) -> np.ndarray:
    """Indices (into ``keys``) of the training examples for one fit."""
    if shots == FULL:
        return np.arange(len(keys))
    return few_shot_indices(keys, labels, int(shots), seed, num_classes)


def per_example(keys: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The per-test-example outputs of one fit, from its class scores (logits)."""
    scores = np.asarray(scores, dtype=np.float64)
    z = scores - scores.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rows = np.arange(len(labels))
    true = scores[rows, labels]
    other = scores.copy()
    other[rows, labels] = -np.inf
    return pd.DataFrame(
        {
            "example": rows.astype(np.int64),
            "key": keys.astype(str),
            "label": labels.astype(np.int64),
            "prediction": scores.argmax(1).astype(np.int64),
            "correct_prob": probs[rows, labels],
            "margin": true - other.max(1),
        }
    )


def _result(fit: Fit, scores: np.ndarray, test_keys, test_y, num_classes: int, n_train: int, **extra) -> FitResult:
    pred = scores.argmax(1)
    metrics = {
        "accuracy": float(np.mean(pred == test_y)),
        "mean_per_class_accuracy": mean_per_class_accuracy(pred, test_y, num_classes),
        "num_train_examples": int(n_train),
        **extra,
    }
    return FitResult(metrics, per_example(test_keys, test_y, scores))


class _Images:
    """A split's images for fine-tuning and scoring: keys and labels always; the decoded uint8
    images held in memory when they take at most ``TRANSFERLAB_MAX_HELD_IMAGE_BYTES`` (default
    2 GiB), else decoded batch by batch each time they are needed — only the rows asked for, or
    one batch at a time for scoring — so a task of a million images fits a trial's memory."""

    def __init__(self, dataset: ShardedDataset, split: str, image_size: int):
        from datasets_.pipeline import decode_split, may_hold_decoded

        self.dataset, self.split, self.image_size = dataset, split, image_size
        self.held = None
        if may_hold_decoded(dataset.num_samples(split), image_size):
            self.held, self.y, self.keys = decode_split(dataset, split, image_size)
        else:
            s = dataset.keys_and_labels(split)
            self.keys, self.y = s.keys.astype(str), s.labels

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 images at ``rows`` (positions in read order, or a boolean mask), in that order."""
        from datasets_.pipeline import decode_rows

        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        if self.held is not None:
            return self.held[torch.as_tensor(rows)]
        return decode_rows(self.dataset, self.split, self.image_size, rows)

    def scores(self, fn: Callable[[torch.Tensor], np.ndarray], batch_size: int = 512) -> np.ndarray:
        """``fn`` (uint8 images -> class scores) over the whole split, batch by batch, in order."""
        from datasets_.indexed import iter_encoded
        from datasets_.pipeline import decode_uint8

        if self.held is not None:
            batches = (self.held[i : i + batch_size] for i in range(0, len(self.held), batch_size))
        else:
            batches = (
                torch.from_numpy(decode_uint8(list(b["image"]), self.image_size))
                for b in iter_encoded(self.dataset, self.split, batch_size, columns=("key", "image"))
            )
        return np.concatenate([fn(x) for x in batches])


def _net_scores(net: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    """Scores of a batch of uint8 images (on the CPU), on the network's device."""
    net.eval()
    device = _device(net)

    @torch.no_grad()
    def fn(x_uint8: torch.Tensor) -> np.ndarray:
        return net(normalize(x_uint8.to(device))).float().cpu().numpy()

    return fn


class _FinetuneNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


@torch.no_grad()
def _logits(net: nn.Module, x_uint8: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Scores of uint8 images (on the CPU), batch by batch on the network's device."""
    net.eval()
    device = _device(net)
    return np.concatenate(
        [
            net(normalize(x_uint8[i : i + batch_size].to(device))).float().cpu().numpy()
            for i in range(0, len(x_uint8), batch_size)
        ]
    )


def train_finetune(
    model,
    train_x: torch.Tensor,
    train_y: np.ndarray,
    num_classes: int,
    lr: float,
    weight_decay: float,
    steps: int,
    batch_size: int,
    seed: int,
    head_init: tuple[np.ndarray, np.ndarray] | None = None,
    every: int = 0,
    on_eval: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Fine-tune a copy of ``model.backbone`` with a new linear head, for one config: ``steps``
    AdamW steps (cosine decay) of ``batch_size`` shots, the head at :data:`HEAD_LR_MULTIPLIER`
    times ``lr``. ``head_init`` = (W [C, D], b [C]) starts the head from a probe (LP-FT).
    ``on_eval(step, net)`` is called after every ``every`` steps and after the last one (steps
    done so far); it may put ``net`` in eval mode, training resumes in train mode. Evaluating
    draws no random numbers, so the network is the same with or without it. Trains on
    ``model``'s device (the shots move there once, as uint8)."""
    torch.manual_seed(seed)
    device = _device(model)
    y = torch.from_numpy(train_y).to(device)
    train_x = train_x.to(device)
    net = _FinetuneNet(copy.deepcopy(model.backbone), model.feature_dim, num_classes).to(device)
    # Channels-last convolutions: a small-cnn step at batch 32 runs 1.5-1.7x faster on the CPU.
    net = net.to(memory_format=torch.channels_last)
    if head_init is not None:
        net.head.weight.data.copy_(torch.from_numpy(head_init[0]).float())
        net.head.bias.data.copy_(torch.from_numpy(head_init[1]).float())
    else:  # a zero head (as BiT) does not send large random gradients into the backbone
        nn.init.zeros_(net.head.weight)
        nn.init.zeros_(net.head.bias)
    # The new head learns HEAD_LR_MULTIPLIER times faster than the pretrained backbone.
    opt = torch.optim.AdamW(
        [
            {"params": net.backbone.parameters(), "lr_scale": 1.0},
            {"params": net.head.parameters(), "lr_scale": HEAD_LR_MULTIPLIER},
        ],
        lr=lr,
        weight_decay=weight_decay,
    )
    g = torch.Generator().manual_seed(seed)
    n, bs = len(train_y), min(batch_size, len(train_y))
    order, pos = torch.randperm(n, generator=g), 0
    net.train()
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + bs].to(device)
        pos += bs
        for group in opt.param_groups:  # cosine decay over the steps
            group["lr"] = group["lr_scale"] * lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        x = normalize(train_x[idx]).contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(net(x), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_eval is not None and ((every and (step + 1) % every == 0) or step + 1 == steps):
            on_eval(step + 1, net)
            net.train()
    return net


def validation_accuracy(net: nn.Module, val_x: torch.Tensor, val_y: np.ndarray) -> float:
    return float(np.mean(_logits(net, val_x).argmax(1) == val_y)) if len(val_y) else 0.0


def finetune(
    model,
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    num_classes: int,
    settings: FinetuneSettings,
    seed: int,
    head_init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[nn.Module, float, float]:
    """:func:`train_finetune` for each learning rate of ``settings.lr``; the one with the best
    validation accuracy wins. Returns (network, validation accuracy, lr)."""
    best = None
    for lr in settings.lr:
        net = train_finetune(
            model,
            train_x,
            train_y,
            num_classes,
            lr,
            settings.weight_decay,
            settings.steps,
            settings.batch_size,
            seed,
            head_init,
        )
        val_acc = validation_accuracy(net, val_x, val_y)
        if best is None or val_acc > best[1]:
            best = (net, val_acc, lr)
    return best


def frozen_features(
    model,
    checkpoint_dir: str,
    task: ShardedDataset,
    layers: list[str],
    image_size: int,
    cache: FeatureCache | None,
    stats: TransferStats,
) -> dict[tuple[str, str], Features]:
    """(layer, split) -> frozen features of the train and test splits: from the cache, else one
    extraction pass per split for every layer the cache lacks (then cached)."""
    from trainers.pretrain import weights_digest

    feats: dict[tuple[str, str], Features] = {}
    if not layers:
        return feats
    digest = weights_digest(checkpoint_dir)
    missing = []
    for layer in layers:
        got = {
            s: cache.get(feature_key(digest, task.fingerprint, s, layer, image_size)) if cache else None
            for s in ("train", "test")
        }
        if all(v is not None for v in got.values()):
            feats.update({(layer, s): v for s, v in got.items()})
            stats.feature_cache_hits += 1
        else:
            missing.append(layer)
    if missing:
        for split in ("train", "test"):
            for layer, f in extract_layers(model, task, split, image_size, missing).items():
                feats[(layer, split)] = f
                if cache:
                    cache.put(feature_key(digest, task.fingerprint, split, layer, image_size), f)
        stats.feature_extractions += len(missing)
    return feats


def fit_indices(
    keys: np.ndarray, y: np.ndarray, fit: Fit, val_fraction: float, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(shot indices, validation mask) of one fit over a task's train split."""
    val = validation_mask(keys, val_fraction)
    pool = np.flatnonzero(~val)
    return pool[shot_indices(keys[pool], y[pool], fit.shots, fit.seed, num_classes)], val


def _lp_ft_head(final_train: Features, keys: np.ndarray, idx: np.ndarray, val: np.ndarray, num_classes: int, task: str):
    """The logistic probe on final features, folded back to raw features: LP-FT's initial head."""
    if not np.array_equal(final_train.keys, keys):
        raise RuntimeError(f"feature and image order of task '{task}' differ: stale feature cache?")
    f = final_train
    return logistic_probe(f.x[idx], f.y[idx], f.x[val], f.y[val], None, num_classes).raw_head()


@dataclass
class FinetuneProblem:
    """One finetune / lp_ft fit, ready to be trained config by config (a hyperparameter search):
    the pretrained model, its shots, the validation carve-out and, for lp_ft, the probe head."""

    model: nn.Module
    fit: Fit
    task: ShardedDataset
    image_size: int
    train_x: torch.Tensor
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: np.ndarray
    head_init: tuple[np.ndarray, np.ndarray] | None

    def train(
        self, lr: float, weight_decay: float, steps: int, batch_size: int, every: int = 0, on_eval=None
    ) -> nn.Module:
        return train_finetune(
            self.model,
            self.train_x,
            self.train_y,
            self.task.num_classes,
            lr,
            weight_decay,
            steps,
            batch_size,
            self.fit.seed,
            self.head_init,
            every,
            on_eval,
        )

    def validation_accuracy(self, net: nn.Module) -> float:
        return validation_accuracy(net, self.val_x, self.val_y)

    def test(self, net: nn.Module, **extra) -> FitResult:
        """Score ``net`` on the task's test split (after the choice is made, never before)."""
        test = _Images(self.task, "test", self.image_size)
        scores = test.scores(_net_scores(net))
        return _result(self.fit, scores, test.keys, test.y, self.task.num_classes, len(self.train_y), **extra)


def finetune_problem(
    checkpoint_dir: str,
    task: ShardedDataset,
    fit: Fit,
    config: TransferConfig = TransferConfig(),
    cache: FeatureCache | None = None,
    device: torch.device | str | None = None,
) -> FinetuneProblem:
    """The :class:`FinetuneProblem` of one fit: decodes the task's train split once (and, for
    lp_ft, reads or extracts its final features) — the same inputs :func:`evaluate_transfer`
    gives the fit. The model sits on ``device`` (default CPU), where its configs train."""
    from trainers.pretrain import load_model

    model = load_model(checkpoint_dir).to(device or "cpu")
    image_size = config.image_size or model.meta["image_size"]
    im = _Images(task, "train", image_size)
    idx, val = fit_indices(im.keys, im.y, fit, config.val_fraction, task.num_classes)
    head = None
    if fit.protocol == "lp_ft":
        feats = frozen_features(model, checkpoint_dir, task, [FINAL_LAYER], image_size, cache, TransferStats())
        head = _lp_ft_head(feats[(FINAL_LAYER, "train")], im.keys, idx, val, task.num_classes, task.name)
    return FinetuneProblem(model, fit, task, image_size, im.take(idx), im.y[idx], im.take(val), im.y[val], head)


def evaluate_transfer(
    checkpoint_dir: str,
    task: ShardedDataset,
    fits: list[Fit],
    config: TransferConfig = TransferConfig(),
    cache: FeatureCache | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[FitResult], TransferStats]:
    """Every fit of one (checkpoint, task), sharing feature extraction and decoded images; the
    network runs on ``device`` (default CPU), the probes on its features on the CPU."""
    from trainers.pretrain import load_model

    model = load_model(checkpoint_dir).to(device or "cpu")
    image_size = config.image_size or model.meta["image_size"]
    stats = TransferStats()
    C = task.num_classes

    # Frozen features: one extraction per layer and split, unless the cache holds it.
    layers = sorted(
        {f.layer for f in fits if f.protocol in FROZEN_PROTOCOLS}
        | ({FINAL_LAYER} if any(f.protocol == "lp_ft" for f in fits) else set())
    )
    feats = frozen_features(model, checkpoint_dir, task, layers, image_size, cache, stats)

    images: dict[str, _Images] = {}

    def imgs(split: str) -> _Images:
        if split not in images:
            images[split] = _Images(task, split, image_size)
        return images[split]

    results = []
    for fit in fits:
        if fit.protocol == "zero_shot":
            results.append(_zero_shot(model, task, imgs("test"), fit))
            continue
        if fit.protocol in FROZEN_PROTOCOLS:
            train, test = feats[(fit.layer, "train")], feats[(fit.layer, "test")]
            keys, y, x = train.keys, train.y, train.x
        else:
            im = imgs("train")
            keys, y, x = im.keys, im.y, None
        idx, val = fit_indices(keys, y, fit, config.val_fraction, C)
        if fit.protocol == "linear_probe":
            r = ridge_few_shot(x[idx], y[idx], x[val], y[val], test.x, test.y, C)
            results.append(
                _result(
                    fit,
                    r.scores,
                    test.keys,
                    test.y,
                    C,
                    len(idx),
                    validation_accuracy=r.validation_accuracy,
                    l2_reg=r.l2_reg,
                )
            )
        elif fit.protocol == "logistic":
            r = logistic_probe(x[idx], y[idx], x[val], y[val], test.x, C)
            results.append(
                _result(
                    fit,
                    r.scores,
                    test.keys,
                    test.y,
                    C,
                    len(idx),
                    validation_accuracy=r.validation_accuracy,
                    l2_reg=r.l2_reg,
                )
            )
        else:
            head = (
                _lp_ft_head(feats[(FINAL_LAYER, "train")], keys, idx, val, C, task.name)
                if fit.protocol == "lp_ft"
                else None
            )
            test_im = imgs("test")
            net, val_acc, lr = finetune(
                model, im.take(idx), y[idx], im.take(val), y[val], C, config.finetune, fit.seed, head
            )
            scores = test_im.scores(_net_scores(net))
            results.append(
                _result(
                    fit, scores, test_im.keys, test_im.y, C, len(idx), validation_accuracy=val_acc, learning_rate=lr
                )
            )
    return results, stats


def _zero_shot(model, task: ShardedDataset, test: _Images, fit: Fit) -> FitResult:
    from trainers.methods import ClipModel, class_prompts, tokenize, zero_shot_logits

    if not isinstance(model, ClipModel):
        raise ValueError("zero_shot needs a CLIP checkpoint")
    device = _device(model)
    tokens = tokenize(class_prompts(task.classes)).to(device)

    @torch.no_grad()
    def fn(x_uint8: torch.Tensor) -> np.ndarray:
        return zero_shot_logits(model, normalize(x_uint8.to(device)), tokens).float().cpu().numpy()

    scores = test.scores(fn)
    return _result(fit, scores, test.keys, test.y, task.num_classes, 0)
