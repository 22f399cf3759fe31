"""Model registry: architectures are data (a config dict per name), built by one function.

Every pretrained model has a ``backbone`` that maps images to a feature vector (what transfer
protocols read) plus the method's own heads, which transfer drops: a linear classifier
(supervised), an image projection and a text tower (CLIP), a projection MLP (SimCLR).

Besides the small models of :data:`MODELS`, which train on a CPU, the registry holds the
architectures papers use, built by their libraries' factories without downloading weights:
``resnet50`` and ``vit_b_32`` (torchvision) and ``timm:NAME``, any model of timm
(``timm.list_models()`` names them). These are for GPU clusters: a CPU cannot pretrain them at
a useful scale.

Backbones expose *named layers* for layer-wise probes (Abnar et al.): ``block1..N`` of the CNNs
and ViTs (``vit-tiny``, ``vit_b_32``), ``layer1..4`` of the ResNets, timm's own module names of
its ``feature_info`` for ``timm:`` models (``layer1``, ``blocks.0``, ``stages.3`` ...), and
``final`` (the backbone's output, the default). Convolutional feature maps are average-pooled
over space; ViT blocks give their CLS token (the mean of the patch tokens for a timm model that
pools by averaging).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from trainers.protocols import FINAL_LAYER

MODELS: dict[str, dict] = {
    # A few thousand parameters: for tests and smoke runs.
    # bn_momentum 0.3 (PyTorch's default is 0.1): BatchNorm's running statistics must settle
    # within the few dozen steps of a small pretraining run, or eval-mode accuracy lags far
    # behind train mode (measured on MNIST n=500, 2 epochs: 18% at 0.1 vs 67% at 0.3).
    "tiny-cnn": {"arch": "cnn", "widths": [8, 16], "bn_momentum": 0.3},
    # The quickstart model: ~100k parameters, trains on 32x32 images on a laptop CPU.
    "small-cnn": {"arch": "cnn", "widths": [32, 64, 128], "bn_momentum": 0.3},
    # torchvision ResNet-18; with small_input the stem is the CIFAR-style 3x3/stride-1 conv.
    "resnet18": {"arch": "resnet18", "small_input": True},
    # A small ViT (torchvision's VisionTransformer): 4 blocks of width 64 on 4x4 patches.
    "vit-tiny": {"arch": "vit", "patch_size": 4, "num_layers": 4, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128},
    # torchvision ResNet-50 (23.5 M parameters without its classifier). small_input false keeps
    # ImageNet's 7x7/stride-2 stem and max-pool, the model of the papers, meant for images of
    # 128 px and more; true swaps in resnet18's CIFAR-style stem.
    "resnet50": {"arch": "resnet50", "small_input": False},
    # torchvision ViT-B/32 (87.4 M parameters without its head): 12 blocks of width 768 on 32x32 patches.
    "vit_b_32": {"arch": "vit_b_32"},
}
TIMM_PREFIX = "timm:"  # "timm:NAME" builds timm.create_model(NAME), any name timm.list_models() gives
_FIXED_PATCH = {"vit_b_32": 32}  # archs whose image_size must be a multiple of a patch size


def check_timm_name(name: str) -> str:
    """``name`` (a ``timm:NAME`` model name) if timm knows NAME; else a ValueError saying how to
    find names."""
    import timm

    model = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model):
        raise ValueError(
            f"timm has no model '{model}' (list names with python -c \"import timm; "
            f"print(timm.list_models('{model[:3]}*'))\")"
        )
    return name


def model_config(name: str, overrides: dict | None = None, width: float = 1.0) -> dict:
    """The full config of a registered model (or of ``timm:NAME``) with ``overrides`` applied
    and widths scaled.

    ``width`` multiplies the channel counts of a CNN and the hidden width of a ViT (kept a
    multiple of its heads); the widths of the ResNets, ViT-B/32 and timm models are fixed.
    """
    if name.startswith(TIMM_PREFIX):
        cfg = {"arch": "timm", "name": check_timm_name(name).removeprefix(TIMM_PREFIX)}
    elif name in MODELS:
        cfg = copy.deepcopy(MODELS[name])
    else:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))}, or timm:NAME)")
    for k, v in (overrides or {}).items():
        if k not in cfg or k == "arch":
            raise ValueError(
                f"model '{name}' has no setting '{k}' (settings: {', '.join(sorted(set(cfg) - {'arch'})) or 'none'})"
            )
        cfg[k] = v
    if width != 1.0:
        if cfg["arch"] == "cnn":
            cfg["widths"] = [max(1, round(w * width)) for w in cfg["widths"]]
        elif cfg["arch"] == "vit":
            heads = cfg["num_heads"]
            cfg["hidden_dim"] = max(heads, round(cfg["hidden_dim"] * width / heads) * heads)
            cfg["mlp_dim"] = max(1, round(cfg["mlp_dim"] * width))
        else:
            raise ValueError(f"model '{name}' has a fixed width (width must be 1, got {width:g})")
    return cfg


def image_size_multiple(config: dict) -> int:
    """What the image size must be a multiple of: a ViT's patch size, else 1."""
    if config["arch"] == "vit":
        return int(config["patch_size"])
    return _FIXED_PATCH.get(config["arch"], 1)


def layer_names(config: dict) -> tuple[str, ...]:
    """The named layers a backbone of this config offers to layer-wise probes."""
    arch = config["arch"]
    if arch == "cnn":
        blocks = [f"block{i + 1}" for i in range(len(config["widths"]))]
    elif arch in ("resnet18", "resnet50"):
        blocks = [f"layer{i}" for i in range(1, 5)]
    elif arch == "vit":
        blocks = [f"block{i + 1}" for i in range(config["num_layers"])]
    elif arch == "vit_b_32":
        blocks = [f"block{i + 1}" for i in range(12)]
    elif arch == "timm":
        blocks = list(_timm_layer_channels(config["name"]))
    else:
        raise ValueError(f"unknown architecture '{arch}'")
    return (*blocks, FINAL_LAYER)


def _cnn(widths: list[int], bn_momentum: float) -> tuple[nn.Module, int]:
    layers, c_in = [], 3
    for w in widths:
        layers += [
            nn.Conv2d(c_in, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def _resnet(arch: str, small_input: bool) -> tuple[nn.Module, int]:
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _vit(
    image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int
) -> tuple[nn.Module, int]:
    from torchvision.models import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the ViT's patch_size {patch_size}")
    net = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    net.heads = nn.Identity()  # forward() then returns the final-LayerNorm'd CLS token
    return net, hidden_dim


def _vit_b_32(image_size: int) -> tuple[nn.Module, int]:
    from torchvision.models import vit_b_32

    if image_size % 32:
        raise ValueError(f"image_size {image_size} is not a multiple of ViT-B/32's patch size 32")
    net = vit_b_32(weights=None, image_size=image_size)
    net.heads = nn.Identity()
    return net, net.hidden_dim


def _timm(name: str, image_size: int) -> tuple[nn.Module, int]:
    """timm's model ``name``, untrained, without classifier: forward gives pooled features."""
    import timm

    try:  # ViT-like models size their position embeddings to img_size; CNNs take no such argument
        net = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError:
        net = timm.create_model(name, pretrained=False, num_classes=0)
    # Some models (MobileNetV3, ...) put a hidden layer in their head: its width is the output's.
    return net, int(getattr(net, "head_hidden_size", None) or net.num_features)


@functools.cache
def _timm_layer_channels(name: str) -> dict[str, int]:
    """{module name: channels} of the layers timm lists in a model's ``feature_info`` (built on
    the meta device: nothing is allocated)."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False, num_classes=0)
    return {f["module"]: int(f["num_chs"]) for f in getattr(net, "feature_info", None) or ()}


def build_backbone(config: dict, image_size: int) -> tuple[nn.Module, int]:
    """(backbone, feature dimension) of a resolved config (see :func:`model_config`)."""
    arch = config["arch"]
    if arch == "cnn":
        return _cnn(list(config["widths"]), float(config["bn_momentum"]))
    if arch in ("resnet18", "resnet50"):
        return _resnet(arch, bool(config["small_input"]))
    if arch == "vit_b_32":
        return _vit_b_32(image_size)
    if arch == "timm":
        return _timm(config["name"], image_size)
    if arch == "vit":
        return _vit(
            image_size, *(int(config[k]) for k in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim"))
        )
    raise ValueError(f"unknown architecture '{arch}'")


@functools.cache
def timm_build_problem(name: str, image_size: int) -> str | None:
    """Why timm's model ``name`` cannot take images of ``image_size`` (one line), or None: the
    backbone is built and run on the meta device, which checks shapes and allocates nothing."""
    try:
        with torch.device("meta"):
            Backbone({"arch": "timm", "name": name}, image_size)(torch.empty(2, 3, image_size, image_size))
    except Exception as e:  # any failure of third-party code is the spec's problem to report
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


def _layer_modules(backbone: nn.Module, config: dict) -> dict[str, nn.Module]:
    arch = config["arch"]
    if arch == "cnn":  # each block is conv, bn, relu, pool: its output is the pool's
        return {f"block{i + 1}": backbone[4 * i + 3] for i in range(len(config["widths"]))}
    if arch in ("resnet18", "resnet50"):
        return {f"layer{i}": getattr(backbone, f"layer{i}") for i in range(1, 5)}
    if arch == "timm":
        return {n: backbone.get_submodule(n) for n in _timm_layer_channels(config["name"])}
    return {f"block{i + 1}": layer for i, layer in enumerate(backbone.encoder.layers)}


def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:  # N, C, H, W feature map
        return t.mean(dim=(2, 3))
    if t.dim() == 3:  # N, tokens, D: the CLS token
        return t[:, 0]
    return t


def _timm_pool(net: nn.Module, channels: int, t: torch.Tensor) -> torch.Tensor:
    """A timm layer's output pooled to [N, channels]: feature maps may be NCHW or NHWC (Swin),
    so the channel axis is found by its size; tokens give the CLS token where the model pools
    by it, else the mean of the tokens after its prefix tokens."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3)) if t.shape[1] == channels else t.mean(dim=(1, 2))
    if t.dim() == 3:
        prefix = int(getattr(net, "num_prefix_tokens", 0))
        if prefix and getattr(net, "global_pool", None) == "token":
            return t[:, 0]
        return t[:, prefix:].mean(dim=1)
    return t


class Backbone(nn.Module):
    """A registry backbone that can also return intermediate named layers."""

    def __init__(self, config: dict, image_size: int):
        super().__init__()
        self.net, self.feature_dim = build_backbone(config, image_size)
        self.config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def layers(self, x: torch.Tensor, names: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """Features of several named layers from one forward pass."""
        modules = _layer_modules(self.net, self.config)
        unknown = [n for n in names if n != FINAL_LAYER and n not in modules]
        if unknown:
            raise ValueError(f"no layer '{unknown[0]}' (layers: {', '.join(layer_names(self.config))})")
        out: dict[str, torch.Tensor] = {}
        pool = self._pooler()
        hooks = [
            modules[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, pool(n, o)))
            for n in names
            if n != FINAL_LAYER
        ]
        try:
            final = self.net(x)
        finally:
            for h in hooks:
                h.remove()
        if FINAL_LAYER in names:
            out[FINAL_LAYER] = final
        return {n: out[n] for n in names}

    def _pooler(self):
        """(layer name, output) -> pooled [N, D] features of that layer."""
        if self.config["arch"] != "timm":
            return lambda _n, t: _pool(t)
        channels = _timm_layer_channels(self.config["name"])
        return lambda n, t: _timm_pool(self.net, channels[n], t)


class Classifier(nn.Module):
    """A backbone and a linear head over its final features (supervised pretraining)."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(config: dict, num_classes: int, image_size: int = 32) -> Classifier:
    """Build a classifier from a resolved config (see :func:`model_config`)."""
    return Classifier(Backbone(config, image_size), num_classes)
