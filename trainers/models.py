"""Model registry: architectures are data (a config dict per name), built by one function.

Every pretrained model has a ``backbone`` that maps images to a feature vector (what transfer
protocols read) plus the method's own heads, which transfer drops: a linear classifier
(supervised), an image projection and a text tower (CLIP), a projection MLP (SimCLR).

Backbones expose *named layers* for layer-wise probes (Abnar et al.): ``block1..N`` of the CNNs
and ViTs, ``layer1..4`` of ResNet-18, and ``final`` (the backbone's output, the default).
Convolutional feature maps are average-pooled over space; ViT blocks give their CLS token.
"""

from __future__ import annotations

import copy

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
}


def model_config(name: str, overrides: dict | None = None, width: float = 1.0) -> dict:
    """The full config of a registered model with ``overrides`` applied and widths scaled.

    ``width`` multiplies the channel counts of a CNN and the hidden width of a ViT (kept a
    multiple of its heads); ResNet-18's width is fixed.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    cfg = copy.deepcopy(MODELS[name])
    for k, v in (overrides or {}).items():
        if k not in cfg or k == "arch":
            raise ValueError(
                f"model '{name}' has no setting '{k}' (settings: {', '.join(sorted(set(cfg) - {'arch'}))})"
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


def layer_names(config: dict) -> tuple[str, ...]:
    """The named layers a backbone of this config offers to layer-wise probes."""
    arch = config["arch"]
    if arch == "cnn":
        blocks = [f"block{i + 1}" for i in range(len(config["widths"]))]
    elif arch == "resnet18":
        blocks = [f"layer{i}" for i in range(1, 5)]
    elif arch == "vit":
        blocks = [f"block{i + 1}" for i in range(config["num_layers"])]
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


def _resnet18(small_input: bool) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
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


def build_backbone(config: dict, image_size: int) -> tuple[nn.Module, int]:
    """(backbone, feature dimension) of a resolved config (see :func:`model_config`)."""
    arch = config["arch"]
    if arch == "cnn":
        return _cnn(list(config["widths"]), float(config["bn_momentum"]))
    if arch == "resnet18":
        return _resnet18(bool(config["small_input"]))
    if arch == "vit":
        return _vit(
            image_size, *(int(config[k]) for k in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim"))
        )
    raise ValueError(f"unknown architecture '{arch}'")


def _layer_modules(backbone: nn.Module, config: dict) -> dict[str, nn.Module]:
    arch = config["arch"]
    if arch == "cnn":  # each block is conv, bn, relu, pool: its output is the pool's
        return {f"block{i + 1}": backbone[4 * i + 3] for i in range(len(config["widths"]))}
    if arch == "resnet18":
        return {f"layer{i}": getattr(backbone, f"layer{i}") for i in range(1, 5)}
    return {f"block{i + 1}": layer for i, layer in enumerate(backbone.encoder.layers)}


def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:  # N, C, H, W feature map
        return t.mean(dim=(2, 3))
    if t.dim() == 3:  # N, tokens, D: the CLS token
        return t[:, 0]
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
        hooks = [
            modules[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, _pool(o)))
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
