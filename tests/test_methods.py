"""Pretraining methods and transfer protocols, without Ray: losses against hand-computed values,
distributed losses against single-process ones (2 real gloo processes), probes against references,
named layers of every registry model, the feature cache."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers.features import FeatureCache, Features, feature_key
from trainers.methods import (
    ClipModel,
    SimCLRModel,
    batch_caption_ids,
    caption_class_embeddings,
    class_prompts,
    contrastive_loss,
    knn_top1,
    nt_xent_loss,
    simclr_views,
    tokenize,
    zero_shot_logits,
)
from trainers.models import MODELS, Backbone, image_size_multiple, layer_names, model_config
from trainers.probe import logistic_probe
from trainers.transfer import per_example

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# Losses against values computed by hand.


def test_nt_xent_matches_a_hand_computed_value():
    # Two images, 2-d projections; views chosen so that every cosine similarity is simple.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    t = 0.5
    # Rows (normalized): a=(1,0), b=(0,1), c=(1,1)/√2, d=(0,-1); positives a-c, b-d.
    r = 1 / math.sqrt(2)
    sims = {  # similarity of each anchor to (its positive, the two negatives)
        "a": (r, [0.0, 0.0]),  # a·c, a·b, a·d
        "b": (-1.0, [0.0, r]),  # b·d, b·a, b·c
        "c": (r, [r, -r]),  # c·a, c·b, c·d
        "d": (-1.0, [0.0, -r]),  # d·b, d·a, d·c
    }
    expected = np.mean(
        [-(p / t) + math.log(math.exp(p / t) + sum(math.exp(n / t) for n in negs)) for p, negs in sims.values()]
    )
    assert float(nt_xent_loss(z1, z2, temperature=t)) == pytest.approx(expected, rel=1e-6)


def test_clip_loss_matches_a_hand_computed_value():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0]]), dim=1)
    scale = torch.tensor(10.0)
    logits = (scale * img @ txt.T).numpy()

    def ce(rows):  # mean over rows of -log softmax(row)[i]
        return np.mean([-(row[i] - np.log(np.exp(row).sum())) for i, row in enumerate(rows)])

    expected = (ce(logits) + ce(logits.T)) / 2
    assert float(contrastive_loss(img, txt, scale)) == pytest.approx(expected, rel=1e-6)


def _embeddings(n: int = 12, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), dim=1)


def test_contrastive_loss_with_distinct_captions_is_open_clips_clip_loss():
    from open_clip.loss import ClipLoss

    img, txt = _embeddings()
    reference = ClipLoss()(img, txt, torch.tensor(7.0))
    ids = torch.arange(12)
    assert float(contrastive_loss(img, txt, torch.tensor(7.0), ids)) == pytest.approx(float(reference), rel=1e-6)
    assert float(contrastive_loss(img, txt, torch.tensor(7.0))) == pytest.approx(float(reference), rel=1e-6)


def test_identical_captions_are_positives_not_negatives():
    tokens = tokenize(["a photo of a 1.", "a photo of a 2.", "a photo of a 1.", "a 1 in bold type."])
    ids = batch_caption_ids(tokens)
    assert ids[0] == ids[2] and len({int(i) for i in ids}) == 3
    noise, txt = _embeddings(4)
    # Images that match their own captions; caption 2 (caption 0's twin) lies near caption 0, and
    # so does image 2.
    txt = torch.cat([txt[:2], F.normalize(txt[0] + 0.3 * noise[0], dim=0)[None], txt[3:]])
    img = F.normalize(txt + 0.3 * noise[[1, 2, 3, 0]], dim=1).requires_grad_()
    scale = torch.tensor(10.0)
    # Positives whose text embeddings differ: treated as negatives (ClipLoss), image 2 is pushed
    # away from text 0; as positives it is pulled toward it, and the loss is lower.
    as_negatives, as_positives = contrastive_loss(img, txt, scale), contrastive_loss(img, txt, scale, ids)
    assert float(as_positives.detach()) < float(as_negatives.detach())
    (g_neg,) = torch.autograd.grad(as_negatives, img)
    (g_pos,) = torch.autograd.grad(as_positives, img)
    assert float(-g_pos[2] @ txt[0]) > float(-g_neg[2] @ txt[0])
    # A text tower gives identical token rows identical embeddings; then the two targets agree
    # (each positive scores the same), and so do loss and gradient: the multi-positive target
    # changes nothing there. Differing captions, not the loss, are what let CLIP learn.
    txt_same = txt[[0, 1, 0, 3]]
    same_pos, same_neg = contrastive_loss(img, txt_same, scale, ids), contrastive_loss(img, txt_same, scale)
    assert float(same_pos.detach()) == pytest.approx(float(same_neg.detach()), rel=1e-6)
    (g1,), (g2,) = torch.autograd.grad(same_pos, img), torch.autograd.grad(same_neg, img)
    torch.testing.assert_close(g1, g2)


def test_zero_shot_classes_average_each_class_distinct_training_captions():
    torch.manual_seed(0)
    model = ClipModel(Backbone(model_config("tiny-cnn"), 8)).eval()
    prompts = tokenize(class_prompts(["0", "1", "2"]))
    captions = ["a 0 with thin strokes.", "a 0 with thick strokes.", "a 0 with thin strokes.", "a 1, slanted."]
    got = caption_class_embeddings(model, tokenize(captions), torch.tensor([0, 0, 0, 1]), prompts)
    encode = model.encode_text
    thin_thick = F.normalize(encode(tokenize(captions[:2])).mean(0), dim=0)  # the repeat counts once
    torch.testing.assert_close(got[0], thin_thick)
    torch.testing.assert_close(got[1], encode(tokenize(captions[3:]))[0])
    torch.testing.assert_close(got[2], encode(prompts[2:])[0])  # no caption: its prompt
    # Captions that are the class prompts give exactly the single-prompt classifier.
    same = caption_class_embeddings(model, prompts[[0, 1, 2, 1]], torch.tensor([0, 1, 2, 1]), prompts)
    torch.testing.assert_close(same, encode(prompts))
    images = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(zero_shot_logits(model, images, same), zero_shot_logits(model, images, prompts))


def test_contrastive_loss_runs_under_vmap_over_stacked_models():
    models = [_embeddings(8, seed=s) for s in range(3)]
    img = torch.stack([m[0] for m in models])
    txt = torch.stack([m[1] for m in models])
    scale = torch.tensor([5.0, 10.0, 20.0])
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])
    stacked = torch.func.vmap(contrastive_loss, in_dims=(0, 0, 0, None))(img, txt, scale, ids)
    one_by_one = [contrastive_loss(img[k], txt[k], scale[k], ids) for k in range(3)]
    np.testing.assert_allclose(stacked.numpy(), torch.stack(one_by_one).numpy(), rtol=1e-6)
    grads = torch.func.vmap(torch.func.grad(contrastive_loss), in_dims=(0, 0, 0, None))(img, txt, scale, ids)
    assert grads.shape == img.shape and torch.isfinite(grads).all()


def test_cross_entropy_of_the_supervised_method_matches_a_hand_computed_value():
    from trainers.pretrain import _step_functions

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    seen = []

    def model(x):  # a "network" with fixed outputs, so the loss is known by hand
        seen.append(x)
        return logits

    batch = {"image": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), "label": torch.tensor([0, 2])}
    step = _step_functions("supervised", model, torch.device("cpu"), "none", seed=0)
    expected = np.mean([-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))), -(0.0 - math.log(2 * math.exp(0.5) + 1))])
    assert float(step(batch)) == pytest.approx(expected, rel=1e-6)
    assert seen[0].dtype == torch.float32 and float(seen[0].max()) < 5  # normalized, not raw uint8


def test_clip_captions_come_from_the_data_else_from_the_class_name_template():
    from datasets_.pipeline import training_captions

    caps, swapped = training_captions(
        ["a", "b", "c"],
        ["a handwritten seven", "", None],
        np.array([7, 3, 1]),
        class_prompts([f"digit_{i}" for i in range(10)]),
        view=None,
    )
    assert caps == ["a handwritten seven", "a photo of a digit 3.", "a photo of a digit 1."]
    assert not np.any(swapped)  # no view, no caption noise
    caps, _ = training_captions(["a"], None, np.array([2]), class_prompts(["cat", "dog", "bird"]), view=None)
    assert caps == ["a photo of a bird."]


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    from trainers.pretrain import lr_at

    assert lr_at(0.5, 1.0, epochs=5, warmup_epochs=1, schedule="cosine") == pytest.approx(0.501)
    assert lr_at(1.0, 1.0, 5, 1, "cosine") == pytest.approx(1.0)
    assert lr_at(3.0, 1.0, 5, 1, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(5.0, 1.0, 5, 1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(4.0, 0.1, 5, 0, "constant") == 0.1


# ---------------------------------------------------------------------------------------------
# One worker with the global batch vs two workers with half each: same loss, same gradient.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Caption ids of the 8-row global batch: rows 0, 2, 5 share a caption, and 1, 6 (across ranks).
SHARED_IDS = torch.tensor([0, 1, 0, 2, 3, 0, 1, 4])


def _losses_and_grads(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> dict:
    """Loss and input gradients of the contrastive losses for embeddings a, b (CLIP's with all
    captions distinct and with the shared caption ``ids``)."""
    out = {}
    for name in ("nt_xent", "clip", "clip_shared"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        if name == "nt_xent":
            loss = nt_xent_loss(x, y)
        else:
            shared = ids if name == "clip_shared" else None
            loss = contrastive_loss(F.normalize(x, dim=1), F.normalize(y, dim=1), torch.tensor(5.0), shared)
        loss.backward()
        out[name] = (float(loss.detach()), x.grad.clone(), y.grad.clone())
    return out


def _model_step(name: str, part: slice = slice(None), ddp: bool = False) -> dict[str, np.ndarray]:
    """Parameter gradients of one training step of the CLIP or SimCLR model (a tiny ViT: no
    BatchNorm, whose per-worker statistics would differ) on rows ``part`` of a fixed batch,
    through DistributedDataParallel when ``ddp``."""
    torch.manual_seed(0)
    images, views = torch.randn(8, 3, 8, 8), torch.randn(16, 3, 8, 8)
    tokens = tokenize([f"a photo of a {i % 3}." for i in range(8)])  # shared across ranks too
    backbone = Backbone(model_config("vit-tiny"), 8)
    model = ClipModel(backbone) if name == "clip" else SimCLRModel(backbone)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model

    def loss():
        if name == "clip":
            return contrastive_loss(*net(images[part], tokens[part]), batch_caption_ids(tokens[part]))
        z1, z2 = net(torch.cat([views[:8][part], views[8:][part]])).chunk(2)
        return nt_xent_loss(z1, z2)

    loss().backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    model.zero_grad()
    loss().backward()  # a second step: DDP fails here if a parameter went unused in the first
    return grads


def _rank_main(rank: int, port: int, a: torch.Tensor, b: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        n = a.shape[0] // 2
        part = slice(rank * n, (rank + 1) * n)
        res = _losses_and_grads(a[part], b[part], SHARED_IDS[part])
        # Plain arrays: tensors would travel as shared-memory handles that die with this process.
        out = {k: (loss, ga.numpy(), gb.numpy()) for k, (loss, ga, gb) in res.items()}
        grads = {name: _model_step(name, slice(rank * 4, (rank + 1) * 4), ddp=True) for name in ("clip", "simclr")}
        queue.put((rank, out, grads if rank == 0 else None))
        # Neither rank tears the group down while the other still talks to it: a gloo peer that
        # loses its connection mid-exchange aborts (exit -6, seen once in a loaded suite run).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(420)  # two spawned processes importing torch and open_clip: slow on a loaded machine
def test_contrastive_losses_and_ddp_models_on_two_gloo_workers_equal_one_worker():
    torch.manual_seed(0)
    a, b = torch.randn(8, 5), torch.randn(8, 5)
    single = _losses_and_grads(a, b, SHARED_IDS)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, a, b, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=240) for _ in procs]
    finally:  # a rank that cannot hand its result over would block the test run's exit
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = {rank: out for rank, out, _ in got}
    ddp_grads = next(g for _, _, g in got if g is not None)
    # The real models under DDP, 2 workers with half the batch each: the one-worker gradient of
    # every parameter (DDP averages; the losses gather the global batch with gradients).
    for name in ("clip", "simclr"):
        reference = _model_step(name)
        assert reference.keys() == ddp_grads[name].keys()
        for k, g in reference.items():
            np.testing.assert_allclose(ddp_grads[name][k], g, rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k}")
    for name, (loss, ga, gb) in single.items():
        # Each rank's loss is the mean over its half of the global batch: their mean is the
        # one-worker loss.
        assert (results[0][name][0] + results[1][name][0]) / 2 == pytest.approx(loss, rel=1e-5), name
        # Gathering with gradients gives rank r the gradient of the *sum* of both ranks' losses
        # with respect to its rows: twice the one-worker gradient there, which DDP's averaging
        # over 2 ranks turns into exactly the one-worker parameter gradient.
        for r in range(2):
            rows = slice(4 * r, 4 * (r + 1))
            np.testing.assert_allclose(results[r][name][1], 2 * ga[rows].numpy(), atol=1e-6, err_msg=name)
            np.testing.assert_allclose(results[r][name][2], 2 * gb[rows].numpy(), atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Probes, k-NN, augmentations.


def test_logistic_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, d, c = 120, 6, 3
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) + 1.5 * np.eye(c, d)[y]
    l2 = 0.1
    r = logistic_probe(x, y, x[:30], y[:30], x, c, l2_grid=(l2,), max_iter=500)
    # Ours: mean CE + l2/2 |W|^2 on standardized x; scikit-learn: C * sum CE + 1/2 |W|^2.
    xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=5000).fit(xs, y)
    ours = np.exp(r.scores - r.scores.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    np.testing.assert_allclose(ours, ref.predict_proba(xs), atol=2e-4)
    # Folded into a layer on raw features (LP-FT's head), it gives the same scores.
    w, b = r.raw_head()
    np.testing.assert_allclose(x @ w.T + b, r.scores, atol=1e-8)


def test_logistic_probe_chooses_l2_on_validation():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    x = rng.normal(size=(40, 30)) + 0.3 * y[:, None]
    r = logistic_probe(x[:20], y[:20], x[20:], y[20:], None, 2, l2_grid=(1e-4, 1.0, 100.0))
    assert r.l2_reg in (1e-4, 1.0, 100.0) and r.scores is None
    accs = {
        l2: logistic_probe(x[:20], y[:20], x[20:], y[20:], None, 2, l2_grid=(l2,)).validation_accuracy
        for l2 in (1e-4, 1.0, 100.0)
    }
    assert r.validation_accuracy == max(accs.values())


def test_knn_votes_with_the_nearest_training_features():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    correct, total = knn_top1(train, labels, test, torch.tensor([0, 1, 1]), num_classes=2, k=2)
    assert (correct, total) == (2, 3)  # the third point is labelled 1 but sits among the 0s


def test_simclr_views_are_random_crops_of_the_same_images_and_reproducible():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    v1 = simclr_views(images, torch.Generator().manual_seed(0))
    v2 = simclr_views(images, torch.Generator().manual_seed(0))
    v3 = simclr_views(images, torch.Generator().manual_seed(1))
    assert v1.shape == images.shape and torch.equal(v1, v2) and not torch.allclose(v1, v3)


def test_clip_and_simclr_models_give_normalized_embeddings():
    backbone = Backbone(model_config("tiny-cnn"), 16)
    clip = ClipModel(backbone)
    img, txt, scale = clip(torch.randn(2, 3, 16, 16), tokenize(["a photo of a 3.", "a photo of a 7."]))
    assert img.shape == txt.shape == (2, 64) and torch.allclose(img.norm(dim=1), torch.ones(2))
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
    assert SimCLRModel(Backbone(model_config("tiny-cnn"), 16))(torch.randn(2, 3, 16, 16)).shape == (2, 64)


# ---------------------------------------------------------------------------------------------
# Models: named layers and widths.


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_model_exposes_its_named_layers(name):
    cfg = model_config(name)
    size = max(16, image_size_multiple(cfg))  # ViT-B/32 takes whole 32-pixel patches
    backbone = Backbone(cfg, size).eval()
    names = layer_names(cfg)
    with torch.no_grad():
        out = backbone.layers(torch.randn(2, 3, size, size), names)
        final = backbone(torch.randn(2, 3, size, size))
    assert list(out) == list(names) and names[-1] == "final"
    assert all(t.dim() == 2 and t.shape[0] == 2 for t in out.values())
    assert out["final"].shape[1] == backbone.feature_dim == final.shape[1]
    with pytest.raises(ValueError, match="no layer 'block99'"):
        backbone.layers(torch.randn(1, 3, 16, 16), ["block99"])


def test_width_scales_cnn_and_vit_but_not_resnet():
    assert model_config("tiny-cnn", width=2.0)["widths"] == [16, 32]
    vit = model_config("vit-tiny", width=0.5)
    assert vit["hidden_dim"] % vit["num_heads"] == 0 and vit["hidden_dim"] == 32
    with pytest.raises(ValueError, match="fixed width"):
        model_config("resnet18", width=2.0)


# ---------------------------------------------------------------------------------------------
# Outputs and the feature cache.


def test_per_example_outputs_from_scores():
    scores = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    df = per_example(np.array(["k0", "k1"]), np.array([2, 1]), scores)
    assert df["prediction"].tolist() == [0, 1]
    np.testing.assert_allclose(df["margin"], [1.0 - 2.0, 3.0 - 0.0])
    np.testing.assert_allclose(
        df["correct_prob"], [np.exp(1) / (np.exp(2) + 1 + np.exp(1)), np.exp(3) / (np.exp(3) + 2)]
    )
    assert df.columns.tolist() == ["example", "key", "label", "prediction", "correct_prob", "margin"]


def test_feature_cache_round_trip_is_exact_and_content_addressed(tmp_path):
    cache = FeatureCache(str(tmp_path / "cache"))
    f = Features(
        np.array(["a", "b"]),
        np.array([[0.25, 1.5], [3.0, -1.0]], dtype=np.float32).astype(np.float64),
        np.array([0, 1]),
    )
    key = feature_key("w" * 64, "task-fp", "train", "final", 16)
    assert cache.get(key) is None
    cache.put(key, f)
    got = cache.get(key)
    assert got.keys.tolist() == ["a", "b"] and np.array_equal(got.x, f.x) and got.y.tolist() == [0, 1]
    assert feature_key("w" * 64, "task-fp", "train", "block1", 16) != key
    assert FeatureCache(str(tmp_path / "cache")).get(key) is not None  # another process, same storage


# ---------------------------------------------------------------------------------------------
# Mixed precision: the policy the loop applies (checkable without a GPU), and its spec check.


def test_amp_policy_scales_only_fp16_and_only_on_cuda():
    from trainers.pretrain import amp_policy

    assert amp_policy("cuda", "bf16") == (torch.bfloat16, False)
    assert amp_policy("cuda", "fp16") == (torch.float16, True)
    assert amp_policy("cuda", "none") == (None, False)
    assert amp_policy("cpu", "fp16") == (None, False)


def test_amp_without_a_gpu_is_refused_by_the_spec():
    from orchestrator.spec import SpecError, parse_spec

    base = {"study": "s", "sources": {"m": "builtin:mnist"}, "tasks": {"d": "builtin:digits"}}
    with pytest.raises(SpecError, match=r"^pretrain.amp: bf16 mixed precision runs on CUDA only"):
        parse_spec({**base, "pretrain": {"amp": "bf16"}})
    with pytest.raises(SpecError, match=r"^pretrain.sweep.amp\[1\]: fp16"):
        parse_spec({**base, "pretrain": {"sweep": {"amp": ["none", "fp16"]}}})
    assert parse_spec({**base, "pretrain": {"amp": "fp16"}, "resources": {"use_gpu": True}}).pretrain.base.amp == "fp16"
