"""Pilot of examples/data_based.yaml (Jain et al. 2022): the numbers that size the study (run by
hand, not in tests; docs/results/pilots/data_based.md holds its output and the arithmetic).

It trains ``--models`` datamodels on random halves of builtin:glyphs-planted's classes with the
study's own code (:func:`trainers.stacked.train_stacked`, ``--per-batch`` at once, no Ray, no
MLflow), measures each model's upstream accuracy on the held-out typefaces of its classes, fits
the full-pool logistic probe on the digits task's train split less the influence holdout and
records accuracy, correct-class probability and margin on the holdout (what the sweep records),
then prints:

- upstream and target accuracy over models, and the per-model SD of the target statistics;
- every planted class's effect on the models' mean target statistic (with − without, Welch) and
  its z, and the number of models a z of 4 would need at that effect;
- the per-example permutation test (mask permutations) for the planted classes: top-influencer
  counts and their p, at all models and at half of them (how detection grows with models).

    PYTHONPATH=. python benchmarks/pilot_data_based.py --models 96 --per-batch 16 --out /tmp/pilot.npz
    PYTHONPATH=. python benchmarks/pilot_data_based.py --analyse /tmp/pilot.npz
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def train_pilot(args) -> dict:
    import torch

    from datasets_.builtin import prepare_builtin
    from datasets_.pipeline import decode_split
    from datasets_.views import influence_holdout
    from trainers.features import Features
    from trainers.models import model_config
    from trainers.stacked import (
        TrainSettings,
        probe_outputs,
        stacked_features,
        stacked_upstream_accuracy,
        train_stacked,
    )

    torch.set_num_threads(args.threads)
    src, task = prepare_builtin(args.source), prepare_builtin("digits")
    s = TrainSettings(args.image_size, args.epochs, args.batch_size, args.lr, args.weight_decay)
    images, labels, keys = decode_split(src, "train", s.image_size)
    test_x, test_y, _ = decode_split(src, "test", s.image_size)
    x, y, k = decode_split(task, "train", s.image_size)
    held = influence_holdout(k, 0.2)
    c = len(src.classes)
    rng = np.random.default_rng(args.seed)
    masks = np.zeros((args.models, c), dtype=bool)
    for i in range(args.models):
        masks[i, rng.permutation(c)[: round(c * args.class_fraction)]] = True
    cfg = model_config(args.model)
    out = {k_: [] for k_ in ("upstream", "accuracy", "correct_prob", "margin", "train_loss")}
    t0 = time.monotonic()
    for start in range(0, args.models, args.per_batch):
        idx = list(range(start, min(start + args.per_batch, args.models)))
        sm = train_stacked(cfg, c, images, labels, keys, masks[idx], [args.seed * 100_000 + i for i in idx], s)
        out["upstream"] += list(stacked_upstream_accuracy(sm, test_x, test_y, masks[idx]))
        out["train_loss"] += list(sm.train_loss)
        feats = stacked_features(sm, x)
        for j in range(len(idx)):
            acc, o = probe_outputs(
                Features(k[~held], feats[j][~held], y[~held]),
                Features(k[held], feats[j][held], y[held]),
                task.num_classes,
                args.protocol,
                "full",
                0,
                0.2,
            )
            out["accuracy"].append(acc)
            out["correct_prob"].append(o["correct_prob"].to_numpy())
            out["margin"].append(o["margin"].to_numpy())
        el = time.monotonic() - t0
        print(
            f"{idx[-1] + 1}/{args.models} models, {el:.0f}s ({el / (idx[-1] + 1):.1f}s/model); upstream "
            f"{np.mean(out['upstream']):.3f}, target {np.mean(out['accuracy']):.3f}",
            flush=True,
        )
    res = {k_: np.asarray(v) for k_, v in out.items()}
    res.update(
        masks=masks,
        classes=np.asarray(src.classes),
        labels=y[held],
        seconds=time.monotonic() - t0,
        settings=np.asarray(str(vars(args))),
    )
    np.savez(args.out, **res)
    return res


def analyse(r: dict, permutations: int = 999) -> None:
    from orchestrator.analysis.influence import permutation_test, task_influence

    masks, classes = r["masks"], [str(c) for c in r["classes"]]
    n = len(masks)
    print(f"\n{n} models, {float(r['seconds']):.0f}s training+probing ({float(r['seconds']) / n:.1f}s/model)")
    print(r["settings"])
    up = r["upstream"]
    print(
        f"upstream accuracy: mean {np.nanmean(up):.3f}, min {np.nanmin(up):.3f}, share >= 0.7: {np.mean(up >= 0.7):.2f}"
    )
    acc = r["accuracy"]
    print(
        f"target accuracy (holdout, {r['margin'].shape[1]} examples): mean {acc.mean():.4f}, SD {acc.std(ddof=1):.4f}"
    )
    planted = [c for c in classes if c.startswith("handwritten")]
    stats = {
        "accuracy": acc,
        "mean correct_prob": r["correct_prob"].mean(1),
        "mean margin": r["margin"].mean(1),
    }
    for name, ystat in stats.items():
        inf = task_influence(masks, ystat)
        order = np.argsort(-inf.values[:, 0])
        print(f"\n[{name}] per-model SD {ystat.std(ddof=1):.4f}")
        for c in planted:
            i = classes.index(c)
            d, se = inf.values[i, 0], inf.se[i, 0]
            z = d / se
            need = math.ceil(n * (4 / z) ** 2) if z else float("inf")
            rank = int(np.flatnonzero(order == i)[0]) + 1
            print(
                f"  {c:>20}: effect {d:+.4f} ± {se:.4f} (z {z:+.1f}), rank {rank}/{len(classes)}; "
                f"z=4 needs ~{need} models"
            )
        others = [i for i in range(len(classes)) if classes[i] not in planted]
        print(f"  glyph classes: effect range {inf.values[others, 0].min():+.4f} .. {inf.values[others, 0].max():+.4f}")
    for column in ("margin", "correct_prob"):
        for m in (n // 2, n):
            t = permutation_test(masks[:m], r[column][:m], permutations, seed=0)
            summary = t.class_summary(classes)
            print(f"\n[per-example {column}, {m} models] top-influencer counts (null mean, p):")
            for _, row in summary.head(4).iterrows():
                print(
                    f"  {row['class']:>20}: {int(row['top_examples'])} "
                    f"({row['top_examples_null']:.1f}, p {row['p']:.3g})"
                )
            for c in planted:
                i = classes.index(c)
                row = summary[summary["class"] == c].iloc[0]
                sig = int((t.p_family[i] < 0.01).sum())
                print(
                    f"  {c:>20}: top of {int(row['top_examples'])} (null {row['top_examples_null']:.1f}, "
                    f"p {row['p']:.3g}); examples at family-wise p<0.01: {sig}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="glyphs-planted")
    ap.add_argument("--models", type=int, default=96)
    ap.add_argument("--per-batch", type=int, default=16)
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--class-fraction", type=float, default=0.5)
    ap.add_argument("--protocol", default="logistic")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="pilot_data_based.npz")
    ap.add_argument("--analyse", default=None, help="analyse a saved pilot instead of training")
    ap.add_argument("--permutations", type=int, default=999)
    args = ap.parse_args()
    if args.analyse:
        analyse(dict(np.load(args.analyse)), args.permutations)
    else:
        analyse(train_pilot(args), args.permutations)


if __name__ == "__main__":
    main()
