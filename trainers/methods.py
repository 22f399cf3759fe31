"""The pretraining methods: their models, losses, augmentations and upstream evaluations.

- ``supervised``: :class:`~trainers.models.Classifier`, cross-entropy on the (possibly noisy)
  labels; upstream accuracy = top-1 on the held-out split.
- ``clip``: :class:`ClipModel`, a registry image backbone with a linear projection beside an
  open_clip text transformer (``open_clip.transformer.TextTransformer``, small custom config, no
  pretrained weights), trained with :func:`contrastive_loss`: open_clip's ClipLoss, except that
  samples of one batch with identical captions are positives of each other, not negatives
  (:func:`batch_caption_ids`). Text is tokenized with open_clip's
  ``SimpleTokenizer``, whose BPE vocabulary ships inside the package (works offline). Captions
  come from the data's caption field, or from ``CLIP_TEMPLATE`` and the class name when the
  source has only labels. Upstream accuracy = zero-shot top-1 against each class's training
  captions, encoded and averaged (:func:`caption_class_embeddings`; the class-name prompt for a
  class without captions).
- ``simclr``: :class:`SimCLRModel`, a backbone with a 2-layer projection MLP (dropped for
  transfer), trained with :func:`nt_xent_loss` on two augmented views per image
  (:func:`simclr_views`, batched on the training device). Upstream accuracy = k-NN top-1 of the
  held-out split against the training split's features (:func:`knn_top1`).

Cross-worker contrastive losses see the whole global batch: embeddings are all-gathered with
gradients, so 1 worker with batch B and 2 workers with B/2 each optimize the same loss.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models import Backbone
from trainers.protocols import METHODS

CLIP_TEMPLATE = "a photo of a {label}."
# Text tower of the small CLIP models: the tokenizer's full vocabulary, a short context.
CLIP_TEXT = {"context_length": 32, "width": 64, "heads": 4, "layers": 2}
CLIP_EMBED_DIM = 64
SIMCLR_PROJECTION_DIM = 64
SIMCLR_TEMPERATURE = 0.2
KNN_K = 20
KNN_TEMPERATURE = 0.07


# --------------------------------------------------------------------------------------------
# Distributed helpers (no-ops on one process).


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to its owner.

    Works on gloo and NCCL alike (one all_reduce in backward). Every rank must contribute a
    tensor of the same shape.
    """

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(embeddings of all ranks concatenated, offset of this rank's rows in them)."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


@torch.no_grad()
def gather_ragged(x: torch.Tensor) -> torch.Tensor:
    """all_gather of tensors whose first dimension differs across ranks (no gradient)."""
    _, world = _world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# --------------------------------------------------------------------------------------------
# SimCLR.


class SimCLRModel(nn.Module):
    def __init__(self, backbone: Backbone, projection_dim: int = SIMCLR_PROJECTION_DIM):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = d = backbone.feature_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = SIMCLR_TEMPERATURE) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of two views' projections, over the global batch.

    For each of the 2N embeddings, cross-entropy of its positive (the other view of the same
    image) against the other 2N - 1 embeddings of the global batch, cosine similarity / τ; the
    mean over this rank's 2n rows. On one process N = n.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    local = torch.cat([z1, z2])  # rows 0..n-1: view 1, n..2n-1: view 2
    everything, offset = gather_with_grad(local)
    world_n = everything.shape[0] // 2
    # Reorder the gathered [r0v1, r0v2, r1v1, r1v2, ...] so that the positive of global row i
    # (view 1 of image i) is row i + N.
    blocks = everything.view(-1, 2, n, everything.shape[1])
    all_z = torch.cat([blocks[:, 0].reshape(world_n, -1), blocks[:, 1].reshape(world_n, -1)])
    rank_index = offset // (2 * n)
    own = torch.cat([torch.arange(n) + rank_index * n, torch.arange(n) + rank_index * n + world_n]).to(z1.device)
    positives = torch.cat([own[n:], own[:n]])
    logits = local @ all_z.T / temperature
    logits[torch.arange(2 * n, device=z1.device), own] = float("-inf")  # not oneself
    return F.cross_entropy(logits, positives)


def simclr_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random SimCLR augmentation of a batch of normalized images (N, 3, S, S), on device.

    Random resized crop (scale 0.3-1, aspect 3/4-4/3) with horizontal flip as one affine
    resampling, colour jitter (brightness, contrast, saturation 0.4) with p=0.8, grayscale with
    p=0.2. Draws come from ``generator`` (a CPU generator: reproducible on any device).
    """
    n, device = images.shape[0], images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(device)

    scale = 0.3 + 0.7 * rand(n)
    log_ratio = (rand(n) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(scale * ratio).clamp(max=1.0)
    sy = torch.sqrt(scale / ratio).clamp(max=1.0)
    tx = (rand(n) * 2 - 1) * (1 - sx)
    ty = (rand(n) * 2 - 1) * (1 - sy)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = (rand(n) < 0.8).float().view(n, 1, 1, 1)
    b = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * 0.4
    c = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * 0.4
    s = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * 0.4
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    mean = gray.mean(dim=(2, 3), keepdim=True)
    jittered = (x * b - mean) * c + mean
    jittered = gray + (jittered - gray) * s
    x = jitter * jittered + (1 - jitter) * x
    to_gray = (rand(n) < 0.2).float().view(n, 1, 1, 1)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return to_gray * gray + (1 - to_gray) * x


@torch.no_grad()
def knn_top1(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> tuple[int, int]:
    """(correct, total) of a weighted k-NN classifier on cosine similarity (Wu et al. 2018).

    Each test point votes with its k nearest training features, weighted by exp(sim / τ).
    """
    train_x = F.normalize(train_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    correct = 0
    for i in range(0, test_x.shape[0], chunk):
        q = F.normalize(test_x[i : i + chunk].float(), dim=1)
        sim, idx = (q @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], torch.exp(sim / temperature))
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum())
    return correct, int(test_x.shape[0])


# --------------------------------------------------------------------------------------------
# CLIP.


@functools.lru_cache(maxsize=4)
def tokenizer(context_length: int = CLIP_TEXT["context_length"]):
    """open_clip's BPE tokenizer (vocabulary file inside the package: no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str], context_length: int = CLIP_TEXT["context_length"]) -> torch.Tensor:
    return tokenizer(context_length)(list(texts))


def class_prompts(classes: list[str]) -> list[str]:
    return [CLIP_TEMPLATE.format(label=c.replace("_", " ")) for c in classes]


class ClipModel(nn.Module):
    """Image backbone + projection, and an open_clip text transformer, in one embedding space."""

    def __init__(self, backbone: Backbone, embed_dim: int = CLIP_EMBED_DIM, text: dict | None = None):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.image_proj = nn.Linear(backbone.feature_dim, embed_dim, bias=False)
        self.text = TextTransformer(**(text or CLIP_TEXT), output_dim=embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.backbone(x)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        # The clamp at 100 is CLIP's: the temperature may not sharpen logits beyond it.
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().clamp(max=100)


@torch.no_grad()
def batch_caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """int64 [n]: one id per distinct token row of the *global* batch, for this rank's n rows.

    Equal ids mean identical captions (:func:`contrastive_loss`'s positives). Every rank gathers
    the token rows of all ranks (equal batch sizes, as the loss's gather requires) and numbers
    the distinct rows, so ids compare across ranks. Call it once per batch, outside any vmap.
    """
    rank, _ = _world()
    _, ids = torch.unique(gather_ragged(tokens), dim=0, return_inverse=True)
    n = tokens.shape[0]
    return ids[rank * n : rank * n + n]


def contrastive_loss(
    image_f: torch.Tensor, text_f: torch.Tensor, scale: torch.Tensor, caption_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss over the global batch, identical captions as positives.

    ``image_f`` and ``text_f`` are this rank's normalized embeddings [n, d], ``scale`` the logit
    scale, ``caption_ids`` the :func:`batch_caption_ids` of the n captions (None: all distinct). Embeddings
    are all-gathered with gradients (N rows over all ranks); each local image scores all N texts
    and each local text all N images. The target of a row is uniform over its positives, the
    samples whose caption id equals its own (itself included), and the loss is the mean of the
    image->text and text->image soft-target cross-entropies. With distinct captions it is exactly
    open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``; with one caption per class
    it no longer pushes apart images and captions of the same class.

    No data-dependent control flow, no ``.item()``: ``torch.func.vmap`` over stacked models'
    embeddings (and ids) gives each model's loss.
    """
    all_image, offset = gather_with_grad(image_f)
    all_text, _ = gather_with_grad(text_f)
    n, world_n = image_f.shape[0], all_image.shape[0]
    if caption_ids is None:
        positives = F.one_hot(torch.arange(n, device=image_f.device) + offset, world_n).to(image_f.dtype)
    else:
        positives = (caption_ids[:, None] == gather_ragged(caption_ids)[None, :]).to(image_f.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    per_image = -(targets * F.log_softmax(scale * image_f @ all_text.T, dim=1)).sum(dim=1)
    per_text = -(targets * F.log_softmax(scale * text_f @ all_image.T, dim=1)).sum(dim=1)
    return (per_image.mean() + per_text.mean()) / 2


@torch.no_grad()
def zero_shot_logits(model: ClipModel, images: torch.Tensor, class_tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image to each class prompt (scaled as in training);
    ``class_tokens`` may instead be class text embeddings [C, d] (float: used as they are)."""
    text = class_tokens if class_tokens.is_floating_point() else model.encode_text(class_tokens.to(images.device))
    return model.logit_scale.exp() * model.encode_image(images) @ text.to(images.device).T


@torch.no_grad()
def caption_class_embeddings(
    model: ClipModel, tokens: torch.Tensor, labels: torch.Tensor, prompt_tokens: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Normalized class text embeddings [C, d] for zero-shot classification: each class's
    distinct training captions (``tokens`` [N, context] with their ``labels``) encoded and
    averaged, a prompt ensemble as CLIP averages its 80 templates. A class without captions
    keeps its prompt (``prompt_tokens`` [C, context], :func:`class_prompts`), so captions equal
    to the class prompt give exactly the single-prompt classifier.
    """
    device = next(model.parameters()).device
    rows = torch.unique(torch.cat([labels.long()[:, None], tokens.long()], dim=1), dim=0)
    sums = model.encode_text(prompt_tokens.to(device)).float()
    counts = torch.zeros(sums.shape[0], device=device)
    has = torch.zeros(sums.shape[0], dtype=torch.bool, device=device)
    has[rows[:, 0].to(device)] = True
    sums[has] = 0.0
    for i in range(0, rows.shape[0], chunk):
        part = rows[i : i + chunk].to(device)
        sums.index_add_(0, part[:, 0], model.encode_text(part[:, 1:]).float())
        counts.index_add_(0, part[:, 0], torch.ones(part.shape[0], device=device))
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=1)


# --------------------------------------------------------------------------------------------
# Building and loading.


def build_pretrain_model(method: str, model_config: dict, num_classes: int, image_size: int) -> nn.Module:
    from trainers.models import Classifier

    backbone = Backbone(model_config, image_size)
    if method == "supervised":
        return Classifier(backbone, num_classes)
    if method == "clip":
        return ClipModel(backbone)
    if method == "simclr":
        return SimCLRModel(backbone)
    raise ValueError(f"unknown pretraining method '{method}' (known: {', '.join(METHODS)})")


def clip_text_input(classes: list[str]):
    """What a CLIP model's training batches carry as text (:class:`datasets_.pipeline.TextInput`):
    captions tokenized by :func:`tokenize`, and :func:`class_prompts` for samples without one."""
    from datasets_.pipeline import TextInput

    return TextInput(tokenize, tuple(class_prompts(classes)))
