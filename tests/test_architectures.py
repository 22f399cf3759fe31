"""The architectures papers use, as ``pretrain.model`` names: ``resnet50`` and ``vit_b_32``
(torchvision) and ``timm:NAME`` (any timm model), built by their libraries' factories without
weights. No Ray: the models are built, run on a couple of small images (or on the meta device,
which checks shapes and allocates nothing), and planned.

Every registry name's forward and named layers are also checked by
``tests/test_methods.py::test_every_registry_model_exposes_its_named_layers``.
"""

from __future__ import annotations

import pytest
import torch

from trainers.models import Backbone, layer_names, model_config


def _layer_shapes(name: str, size: int, device: str = "cpu") -> dict[str, tuple[int, ...]]:
    cfg = model_config(name)
    with torch.device(device), torch.no_grad():
        backbone = Backbone(cfg, size).eval()
        out = backbone.layers(torch.randn(2, 3, size, size), layer_names(cfg))
    assert out["final"].shape == (2, backbone.feature_dim)
    return {n: tuple(t.shape) for n, t in out.items()}


def test_resnet50_and_vit_b_32_are_torchvision_s_models_with_their_named_layers():
    shapes = _layer_shapes("resnet50", 224, "meta")  # the paper's input size, on the meta device
    assert shapes == {
        "layer1": (2, 256),
        "layer2": (2, 512),
        "layer3": (2, 1024),
        "layer4": (2, 2048),
        "final": (2, 2048),
    }
    shapes = _layer_shapes("vit_b_32", 64, "meta")
    assert list(shapes) == [f"block{i}" for i in range(1, 13)] + ["final"]
    assert set(shapes.values()) == {(2, 768)}
    with torch.device("meta"):  # torchvision's counts, less the 1000-class head
        assert sum(p.numel() for p in Backbone(model_config("resnet50"), 224).parameters()) == 25_557_032 - 2049 * 1000
        assert sum(p.numel() for p in Backbone(model_config("vit_b_32"), 224).parameters()) == 88_224_232 - 769 * 1000


def test_resnet50_small_input_swaps_in_the_cifar_stem():
    with torch.device("meta"):
        plain = Backbone(model_config("resnet50"), 32).net
        small = Backbone(model_config("resnet50", {"small_input": True}), 32).net
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, torch.nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


@pytest.mark.parametrize(
    ("name", "size", "device", "layers"),
    [
        # a CNN whose head has a hidden layer (1024 wide, wider than its last block)
        ("timm:mobilenetv3_small_050", 32, "cpu", {"blocks.0": 8, "blocks.5": 288, "final": 1024}),
        # a ViT sized to the images, layers read at the CLS token
        ("timm:vit_tiny_patch16_224", 32, "cpu", {"blocks.0": 192, "blocks.11": 192, "final": 192}),
        # channels-last feature maps (Swin's stages are N, H, W, C)
        ("timm:swin_tiny_patch4_window7_224", 64, "meta", {"layers.0": 96, "layers.3": 768, "final": 768}),
    ],
)
def test_timm_models_give_pooled_features_of_their_feature_info_layers(name, size, device, layers):
    shapes = _layer_shapes(name, size, device)
    for layer, width in layers.items():
        assert shapes[layer] == (2, width), (layer, shapes)


def test_timm_vit_layer_is_the_cls_token_timm_gives():
    torch.manual_seed(0)
    backbone = Backbone(model_config("timm:vit_tiny_patch16_224"), 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # timm's own intermediates: (patch tokens as NCHW, prefix tokens) per block
        [(_, prefix)] = backbone.net.forward_intermediates(
            x, indices=[2], return_prefix_tokens=True, intermediates_only=True
        )
        assert torch.allclose(backbone.layers(x, ["blocks.2"])["blocks.2"], prefix[:, 0], atol=1e-6)


def test_a_timm_checkpoint_loads_back(tmp_path):
    """A checkpoint's metadata rebuilds the timm model (no weights fetched) with the same weights."""
    from trainers.methods import build_pretrain_model
    from trainers.pretrain import load_model, save_checkpoint

    cfg = model_config("timm:mobilenetv3_small_050")
    model = build_pretrain_model("supervised", cfg, 4, 32).eval()
    save_checkpoint(
        str(tmp_path), model, {"method": "supervised", "model_config": cfg, "num_classes": 4, "image_size": 32}
    )
    loaded = load_model(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bad_names_and_widths_are_one_line_errors():
    with pytest.raises(ValueError, match=r"timm has no model 'resnet-9000' \(list names with .*timm.list_models"):
        model_config("timm:resnet-9000")
    for name in ("resnet50", "vit_b_32", "timm:resnet18"):
        with pytest.raises(ValueError, match="fixed width"):
            model_config(name, width=0.5)
    with pytest.raises(ValueError, match="not a multiple of ViT-B/32's patch size 32"):
        with torch.device("meta"):
            Backbone(model_config("vit_b_32"), 48)


def test_auto_pack_leaves_resnet50_to_its_torchtrainer():
    """planning.packs: ResNet-50 (23.5 M parameters) is above PACK_MAX_PARAMS, so ``pack: auto``
    packs the tiny-cnn runs of the same study and leaves every resnet50 run alone."""
    from orchestrator.planning.packs import PACK_MAX_PARAMS, plan_packs
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import parse_spec
    from trainers.packed import parameter_count

    spec = parse_spec(
        {
            "study": "big",
            "sources": {"mnist": {"uri": "builtin:mnist"}},
            "tasks": {"digits": {"uri": "builtin:digits"}},
            "pretrain": {
                "image_size": 32,
                "sweep": {"model": ["resnet50", "tiny-cnn"], "pretrain_size": [100, 200]},
            },
            "transfer": {"shots": [1], "seeds": [0], "layers": ["final"]},
        }
    )
    runs = build_plan(spec).pretrain_runs
    big = [r for r in runs if r.settings.model == "resnet50"]
    assert len(big) == 2 and parameter_count(big[0].config) > PACK_MAX_PARAMS
    packs, alone = plan_packs(runs, "auto", 1, {"mnist": 4006}, 1)
    assert {r.config_hash for r in alone} == {r.config_hash for r in big}
    assert [sorted(r.settings.model for r in p.runs) for p in packs] == [["tiny-cnn", "tiny-cnn"]]
