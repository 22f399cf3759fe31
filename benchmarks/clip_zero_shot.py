"""Zero-shot upstream accuracy of CLIP pretrained on the builtin sources at role_of_data's scale.

    python benchmarks/clip_zero_shot.py --sources mnist glyphs --size 2000 --epochs 6 --threads 1

Trains one CLIP model per source in this process (no Ray), with the study's per-batch loss
(the model, :func:`~trainers.methods.contrastive_loss` with :func:`~trainers.methods.
batch_caption_ids`, the captions of the builtin shards tokenized as a study tokenizes them), the
study's lr schedule and optimizer (AdamW, ``lr_at``), then measures zero-shot top-1 on the
source's held-out split two ways: against the class-name prompts alone (``class_prompts``, what a
study recorded as ``upstream_accuracy`` before) and against each class's training captions
encoded and averaged (``caption_ensemble``, :func:`~trainers.methods.caption_class_embeddings`,
what it records now). The ``pretrain_size`` subset is the first ``--size`` training samples in
shard order (a hash order, so classes are mixed). ``--captions class`` trains on the class-name
prompts instead of the shards' captions. Prints one JSON line per source; figures go in
docs/benchmarks.md ("CLIP at this scale").
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from datasets_ import resolve_dataset
from datasets_.pipeline import decode_uint8, normalize
from trainers.methods import (
    batch_caption_ids,
    build_pretrain_model,
    caption_class_embeddings,
    class_prompts,
    contrastive_loss,
    tokenize,
)
from trainers.models import model_config
from trainers.pretrain import lr_at


def load(source: str, split: str, image_size: int, limit: int | None):
    """(uint8 images, labels, captions) of a builtin source's split, in shard order."""
    ds = resolve_dataset(f"builtin:{source}")
    table = ds.read_split(split, ["image", "label", "caption"])
    if limit is not None:
        table = table.slice(0, limit)
    images = torch.from_numpy(decode_uint8(table.column("image").to_pylist(), image_size))
    return images, np.asarray(table.column("label")), table.column("caption").to_pylist(), ds.classes


def small_affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift (±10%), scale (0.9-1.1) and rotation (±10°) of each image."""
    n = x.shape[0]
    r = torch.rand(n, 4, generator=g) * 2 - 1
    angle, scale = r[:, 0] * math.pi / 18, 1 + 0.1 * r[:, 1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = 0.1 * r[:, 2:]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)


def settings(args, pretrain_size: int) -> dict:
    keys = ("epochs", "lr", "batch_size", "warmup_epochs", "logit_scale", "augment", "seed")
    return {"pretrain_size": pretrain_size, **{k: getattr(args, k) for k in keys}}


def train_and_score(args, source: str) -> dict:
    torch.manual_seed(args.seed)
    images, labels, captions, classes = load(source, "train", args.image_size, None if args.size == 0 else args.size)
    if args.captions == "class":
        captions = [class_prompts(classes)[y] for y in labels]
    tokens = tokenize(captions)
    model = build_pretrain_model(args.method, model_config(args.model), len(classes), args.image_size)
    if args.method == "clip" and args.logit_scale is not None:  # initial 1 / temperature
        model.logit_scale.data.fill_(math.log(args.logit_scale))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    g = torch.Generator().manual_seed(args.seed)
    t0, losses = time.perf_counter(), []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=g)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            lr = lr_at(epoch + step / steps_per_epoch, args.lr, args.epochs, args.warmup_epochs, "cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalize(images[idx])
            if args.augment == "affine":
                x = small_affine(x, g)
            if args.method == "supervised":
                loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(labels[idx.numpy()]))
            else:
                image_f, text_f, scale = model(x, tokens[idx])
                loss = contrastive_loss(image_f, text_f, scale, batch_caption_ids(tokens[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    test_x, test_y, _, _ = load(source, "test", args.image_size, None)
    model.eval()
    prompts = tokenize(class_prompts(classes))
    with torch.no_grad():
        if args.method == "supervised":  # the reference: top-1 of the classifier at the same steps
            logits = torch.cat([model(normalize(test_x[i : i + 512])) for i in range(0, len(test_y), 512)])
            return {
                "source": source,
                "method": "supervised",
                **settings(args, len(labels)),
                "top1": round(float((logits.argmax(1).numpy() == test_y).mean()), 4),
                "train_seconds": round(time.perf_counter() - t0, 1),
            }
        image_f = torch.cat([model.encode_image(normalize(test_x[i : i + 512])) for i in range(0, len(test_y), 512)])
        class_f = {
            "class_prompts": model.encode_text(prompts),  # what a study recorded before
            "caption_ensemble": caption_class_embeddings(model, tokens, torch.as_tensor(labels.copy()), prompts),
        }
    scores = {k: round(float(((image_f @ f.T).argmax(1).numpy() == test_y).mean()), 4) for k, f in class_f.items()}
    distinct = len(set(captions)) / len(captions)
    return {
        "source": source,
        "captions": args.captions,
        **settings(args, len(labels)),
        "distinct_caption_share": round(distinct, 3),
        "last_loss": round(losses[-1], 3),
        "zero_shot_accuracy": scores,
        "chance": round(1 / len(classes), 4),
        "train_seconds": round(train_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", default=["mnist", "glyphs"])
    p.add_argument("--size", type=int, default=2000, help="pretrain_size (0: the whole training split)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--method", choices=["clip", "supervised"], default="clip", help="supervised: the reference")
    p.add_argument("--captions", choices=["data", "class"], default="data")
    p.add_argument("--logit-scale", type=float, default=None, help="initial 1 / temperature (default 1 / 0.07)")
    p.add_argument("--augment", choices=["none", "affine"], default="none", help="affine: random shift/scale/turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for source in args.sources:
        print(json.dumps(train_and_score(args, source)), flush=True)


if __name__ == "__main__":
    main()
