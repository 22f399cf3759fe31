"""Packed pretraining (trainers.packed): each run of a pack trains exactly as if alone.

Pure functions on tiny synthetic data: no Ray, no MLflow (the end-to-end study is in
tests/test_packed_study.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets_.pipeline import normalize, training_captions
from datasets_.views import PretrainView
from trainers.methods import (
    batch_caption_ids,
    build_pretrain_model,
    caption_class_embeddings,
    class_prompts,
    contrastive_loss,
    nt_xent_loss,
    simclr_views,
    tokenize,
    zero_shot_logits,
)
from trainers.models import model_config
from trainers.packed import DecodedSplit, train_packed
from trainers.pretrain import PretrainConfig, load_model, lr_at, save_checkpoint
from trainers.protocols import STEP_LOSSES
from trainers.stacked import row_stream

C = 4


def _split(n, seed):
    """Random images; captions as a builtin source has them, a few per class, some missing
    (those samples train on their class prompt)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))
    labels = rng.integers(0, C, n)
    words = ("bold", "thin", "tall")
    captions = [None if i % 5 == 0 else f"a {words[i % 3]} character {'abcd'[y]}." for i, y in enumerate(labels)]
    return DecodedSplit(images, labels, np.array([f"s{seed}-{i}" for i in range(n)]), captions)


def _config(method="supervised", **changes):
    base = dict(
        method=method,
        model_config=model_config("tiny-cnn"),
        num_classes=C,
        classes=tuple("abcd"),
        image_size=8,
        epochs=2,
        batch_size=16,
        lr=0.01,
        weight_decay=5e-4,
        lr_schedule="cosine",
        warmup_epochs=0.0,
        amp="none",
        seed=0,
        num_train_samples=0,
    )
    return PretrainConfig(**{**base, **changes})


def _view(seed=0, label_noise=0.0, threshold=1.0, keep=None):
    return PretrainView("fp", None, label_noise, seed, C, threshold, keep_classes=keep)


def _weights(result):
    return result.model.state_dict()


def _assert_same(a, b, **tol):
    for k, v in a.items():
        x, y = v.float(), b[k].float()
        if k.endswith("attn.in_proj_bias"):
            # The key bias adds q·b to every logit of a row, which softmax ignores: its gradient
            # is zero up to rounding, and Adam's normalized steps turn that rounding into moves of
            # size lr either way. It changes no output; compare the query and value biases.
            third = len(x) // 3
            x, y = torch.cat([x[:third], x[2 * third :]]), torch.cat([y[:third], y[2 * third :]])
        assert torch.allclose(x, y, **tol), k


PACK = [  # what may differ within a pack: view (size, noise, classes, seed) and optimizer
    (_config(seed=1, lr=0.02, epochs=3, warmup_epochs=0.5), _view(1, label_noise=0.3)),
    (
        _config(seed=2, weight_decay=0.05, head_weight_decay=0.0, lr_schedule="constant"),
        _view(2, threshold=0.5, keep=(0, 2, 3)),
    ),
    (_config(seed=3, epochs=1, head_weight_decay=0.5), _view(3)),
]


# clip's three packs of text towers take ~50 s on an idle core; 120 s timed out at load 40-60.
@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=pytest.mark.timeout(400 if m == "clip" else 120)) for m in ("supervised", "simclr", "clip")],
)
def test_a_packed_run_trains_as_it_would_alone(method):
    """Run 1 of a pack of 3 == the same run packed alone == the same run packed with other mates."""
    torch.set_num_threads(1)
    train, held = _split(120, 0), _split(40, 1)
    configs = [c.replace(method=method) for c, _ in PACK]
    views = [v for _, v in PACK]
    three = train_packed(configs, views, [None] * 3, train, held)
    alone = train_packed(configs[1:2], views[1:2], [None], train, held)
    other = train_packed([configs[1], configs[0]], [views[1], views[0]], [None] * 2, train, held)
    # clip: Adam's normalized steps amplify the rounding of batched attention (vmap runs it per
    # model) in the text tower's small biases a little, as simclr's similarity matrix below.
    tol = {"rtol": 1e-3, "atol": 5e-4} if method == "clip" else {"atol": 1e-5}  # clip: measured 1.8e-4
    _assert_same(_weights(three[1]), _weights(alone[0]), **tol)
    _assert_same(_weights(three[1]), _weights(other[0]), **tol)
    assert np.allclose(three[1].epoch_loss, alone[0].epoch_loss, atol=1e-5)
    assert [len(r.epoch_loss) for r in three] == [3, 2, 1]  # each run its own epochs
    # The size subset and class filter reach the stream; upstream accuracy is a share.
    assert three[1].num_train_samples < three[2].num_train_samples == 120
    assert all(0.0 <= r.upstream_accuracy <= 1.0 for r in three)
    first = next(iter(_weights(three[0])))
    assert not torch.allclose(_weights(three[0])[first], _weights(three[1])[first])  # packmates differ


@pytest.mark.timeout(120)
def test_each_packed_run_reports_its_epochs_and_its_step_curve():
    """on_epoch gets each run's epochs in order, each with the batch losses of its own
    log_every_steps steps, numbered from the run's first step as a TorchTrainer run numbers them."""
    torch.set_num_threads(1)
    train, held = _split(96, 0), _split(20, 1)
    configs = [_config(seed=1, log_every_steps=2), _config(seed=2, epochs=1, log_every_steps=3)]
    seen = {0: [], 1: []}
    train_packed(configs, [_view(1), _view(2)], [None] * 2, train, held, on_epoch=lambda b, m: seen[b].append(m))
    steps_per_epoch = 96 // 16
    assert [m["epoch"] for m in seen[0]] == [0, 1] and [m["epoch"] for m in seen[1]] == [0]
    assert [s for m in seen[0] for s, _ in m[STEP_LOSSES]] == list(range(2, 2 * steps_per_epoch + 1, 2))
    assert [s for s, _ in seen[0][1][STEP_LOSSES]] == [8, 10, 12]  # the second epoch's steps only
    assert [s for s, _ in seen[1][0][STEP_LOSSES]] == [3, 6]
    assert all(np.isfinite(loss) and loss > 0 for m in seen[0] + seen[1] for _, loss in m[STEP_LOSSES])


def _plain_loop(config, view, train, step_loss):
    """The reference: one model, torch.optim.AdamW, the run's own stream and lr schedule; the
    parameters outside the backbone in their own group when the run sets head_weight_decay;
    ``step_loss(net, images, labels, rows)``."""
    keep, labels = view.apply(list(train.keys), train.labels)
    order = np.argsort(train.keys, kind="stable")
    stream = row_stream(order[keep[order]], config.batch_size, config.epochs, config.seed)
    torch.manual_seed(config.seed)
    net = build_pretrain_model(config.method, config.model_config, C, 8).train()
    c = config
    head = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": list(net.backbone.parameters()), "weight_decay": c.weight_decay}]
    groups.append(
        {"params": head, "weight_decay": c.weight_decay if c.head_weight_decay is None else c.head_weight_decay}
    )
    opt = torch.optim.AdamW(groups, lr=c.lr)
    for t, rows in enumerate(stream):
        for g in opt.param_groups:
            g["lr"] = lr_at(t * c.epochs / len(stream), c.lr, c.epochs, c.warmup_epochs, c.lr_schedule)
        loss = step_loss(net, normalize(train.images[rows]), torch.from_numpy(labels[rows]), rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmapped", "in-turn"])
def test_a_packed_run_matches_a_plain_adamw_loop(vectorize):
    """Supervised and simclr: a packed run's weights (BatchNorm statistics included) are those of
    a plain loop with torch.optim.AdamW on the same stream, seeds and augmentations, whether the
    pack's steps are vmapped (the accelerator's default) or run in turn (the CPU's)."""
    torch.set_num_threads(1)
    train, held = _split(96, 0), _split(20, 1)
    config, view = PACK[0]
    pack = [config, PACK[2][0]], [view, PACK[2][1]], [None] * 2, train, held
    packed = train_packed(*pack, vectorize=vectorize)[0]

    def ce(net, x, y, _):
        return torch.nn.functional.cross_entropy(net(x), y)

    _assert_same(_weights(packed), _plain_loop(config, view, train, ce), rtol=1e-4, atol=1e-5)

    config = config.replace(method="simclr")
    packed = train_packed([config], [view], [None], train, held, vectorize=vectorize)[0]
    g = torch.Generator().manual_seed(config.seed)

    def nt_xent(net, x, *_):
        z1, z2 = net(torch.cat([simclr_views(x, g), simclr_views(x, g)])).chunk(2)
        return nt_xent_loss(z1, z2)

    # Adam's normalized steps amplify the rounding of the batched similarity matrix a little.
    _assert_same(_weights(packed), _plain_loop(config, view, train, nt_xent), rtol=1e-3, atol=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["supervised", "simclr"])
def test_head_weight_decay_decays_the_head_only_in_a_pack_and_alone(method):
    """head_weight_decay shrinks the head (classifier / projector) and leaves the backbone's own
    decay as it is: packed, a run with a strong head decay has a smaller head than its twin
    without one, and both match a plain torch.optim.AdamW loop whose head is its own group."""
    from trainers.pretrain import optimizer_groups

    torch.set_num_threads(1)
    train, held = _split(96, 0), _split(20, 1)
    # lr 0.01: at 0.02 these random 8x8 images make training chaotic enough that float rounding
    # alone moves a plain loop's weights by 1e-4 (with or without a head decay)
    plain, strong = _config(method, seed=4), _config(method, seed=4, head_weight_decay=5.0)
    a, b = train_packed([plain, strong], [_view(4)] * 2, [None] * 2, train, held)

    def head_norm(r):
        return sum(float(v.detach().norm()) for k, v in r.model.named_parameters() if not k.startswith("backbone."))

    assert head_norm(b) < 0.8 * head_norm(a)
    groups = optimizer_groups(b.model, strong.weight_decay, strong.head_weight_decay)
    assert [g["weight_decay"] for g in groups] == [5e-4, 5.0]
    assert sum(len(g["params"]) for g in groups) == len(list(b.model.parameters()))
    assert len(optimizer_groups(a.model, plain.weight_decay, None)) == 1

    def ce(net, x, y, _):
        return torch.nn.functional.cross_entropy(net(x), y)

    if method == "supervised":  # simclr's plain loop is checked in the test above
        _assert_same(_weights(b), _plain_loop(strong, _view(4), train, ce), rtol=1e-4, atol=1e-5)


def _texts(split, view):
    """What a TorchTrainer clip run's batches carry as text: each caption, or the class prompt
    of the view's label where there is none."""
    _, labels = view.apply(list(split.keys), split.labels)
    return tokenize(training_captions(split.keys, split.captions, labels, class_prompts(list("abcd")), None)[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmapped", "in-turn"])
def test_a_packed_clip_run_matches_a_plain_adamw_loop(vectorize):
    """clip: image and text towers and the logit scale of a packed run (with a packmate of
    another lr, size and class subset) are those of a plain loop on the run's own captions,
    with open_clip-style batch caption ids (identical captions in a batch are positives),
    vmapped or in turn."""
    torch.set_num_threads(1)
    train, held = _split(96, 0), _split(20, 1)
    (config, view), (mate, mate_view) = PACK[0], PACK[1]
    config, mate = config.replace(method="clip"), mate.replace(method="clip")
    packed = train_packed([mate, config], [mate_view, view], [None] * 2, train, held, vectorize=vectorize)[1]
    tokens = _texts(train, view)

    def clip(net, x, _, rows):
        image_f, text_f, scale = net(x, tokens[rows])
        return contrastive_loss(image_f, text_f, scale, batch_caption_ids(tokens[rows]))

    plain = _plain_loop(config, view, train, clip)
    assert plain["logit_scale"] != 0 and "text.token_embedding.weight" in plain
    _assert_same(_weights(packed), plain, rtol=1e-3, atol=1e-4)


def test_a_packed_checkpoint_loads_like_a_torchtrainer_one(tmp_path):
    """save_checkpoint of a packed run is the usual format: load_model rebuilds the same model."""
    train, held = _split(64, 0), _split(20, 1)
    config = _config(meta={"config_hash": "abc", "source": "toy"})
    result = train_packed([config], [_view()], [None], train, held)[0]
    save_checkpoint(str(tmp_path), result.model, result.meta, epoch=config.epochs - 1)
    loaded = load_model(str(tmp_path))
    assert loaded.meta["config_hash"] == "abc" and loaded.meta["method"] == "supervised"
    x = normalize(held.images)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    # upstream accuracy is top-1 on the held-out split, as the TorchTrainer loop measures it
    top1 = float((result.model(x).argmax(1).numpy() == held.labels).mean())
    assert result.upstream_accuracy == pytest.approx(top1)


def test_a_packed_clip_checkpoint_loads_and_scores_zero_shot(tmp_path):
    """A packed clip run's checkpoint loads with load_model (text tower, logit scale included);
    its upstream accuracy is zero-shot top-1 on the held-out split against each class's training
    captions (its view's rows only), as the TorchTrainer loop measures it."""
    train, held = _split(64, 0), _split(20, 1)
    config, view = _config("clip", meta={"config_hash": "c1", "source": "toy"}), _view(threshold=0.5)
    result = train_packed([config], [view], [None], train, held)[0]
    save_checkpoint(str(tmp_path), result.model, result.meta, epoch=config.epochs - 1)
    loaded = load_model(str(tmp_path))
    assert loaded.meta["method"] == "clip" and float(loaded.logit_scale) == float(result.model.logit_scale)
    x = normalize(held.images)
    tokens = tokenize(class_prompts(list("abcd")))
    assert torch.allclose(loaded.encode_text(tokens), result.model.encode_text(tokens), atol=1e-6)
    keep, labels = view.apply(list(train.keys), train.labels)
    classes = caption_class_embeddings(
        loaded, _texts(train, view)[keep], torch.from_numpy(labels[keep]), tokenize(class_prompts(list("abcd")))
    )
    top1 = float((zero_shot_logits(loaded, x, classes).argmax(1).numpy() == held.labels).mean())
    assert result.upstream_accuracy == pytest.approx(top1)


def test_runs_of_different_shapes_are_not_packed():
    train, held = _split(32, 0), _split(8, 1)
    with pytest.raises(ValueError, match="must share"):
        train_packed([_config(), _config(batch_size=8)], [_view()] * 2, [None] * 2, train, held)
    with pytest.raises(ValueError, match="caption_noise are not packed"):
        train_packed([_config("clip", caption_noise=0.3)], [_view()], [None], train, held)


def test_auto_packs_small_runs_of_one_shape_and_fills_the_slots():
    """planning.packs: runs of one source and shape share packs; clip runs with caption noise,
    multi-worker runs and pack: off keep their TorchTrainer; with more slots than packs the
    largest is halved."""
    from orchestrator.planning.packs import plan_packs
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import parse_spec

    spec = parse_spec(
        {
            "study": "packs",
            "sources": {"mnist": {"uri": "builtin:mnist"}},
            "tasks": {"digits": {"uri": "builtin:digits"}},
            "pretrain": {
                "model": "tiny-cnn",
                "image_size": 8,
                "sweep": [
                    {"method": ["supervised"], "pretrain_size": [100, 200], "label_noise": [0.0, 0.2, 0.4]},
                    {"method": ["simclr", "clip"], "pretrain_size": [100]},
                    {"method": ["clip"], "pretrain_size": [100], "caption_noise": [0.3]},
                ],
            },
            "transfer": {"shots": [1], "seeds": [0]},
        }
    )
    runs = build_plan(spec).pretrain_runs
    samples = {"mnist": 4006}
    packs, alone = plan_packs(runs, "auto", 1, samples, 1)
    assert [(r.config.method, r.config.caption_noise) for r in alone] == [("clip", 0.3)]
    assert sorted((len(p.runs), p.runs[0].config.method) for p in packs) == [
        (1, "clip"),
        (1, "simclr"),
        (6, "supervised"),
    ]
    assert {r.config_hash for p in packs for r in p.runs} | {alone[0].config_hash} == {r.config_hash for r in runs}
    packs, _ = plan_packs(runs, "auto", 1, samples, 4)
    assert sorted(len(p.runs) for p in packs) == [1, 1, 3, 3]  # 6 -> 3 + 3: four slots
    assert plan_packs(runs, "off", 1, samples, 1) == ([], runs)
    assert plan_packs(runs, "auto", 2, samples, 1)[0] == []  # resources.workers > 1
    assert plan_packs(runs, "auto", 1, {"mnist": 10**9}, 1)[0] == []  # the split would not fit in memory
