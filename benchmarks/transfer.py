"""Wall time of a shots × seeds × protocols transfer grid with the feature cache vs without it.

    python benchmarks/transfer.py --model small-cnn --image-size 32 --shots 1 5 10 full --seeds 5 --threads 1

Pretrains one checkpoint in-process (supervised, builtin:mnist, ``--pretrain-epochs``; no Ray:
only the transfer side is timed), then runs the same grid of frozen-feature fits (linear_probe
and logistic, every shots × seed, 'full' once, as a study plans them) on builtin:digits three ways:

- **no cache**: one :func:`trainers.transfer.evaluate_transfer` call per fit without a cache, so
  every fit loads the checkpoint and extracts the task's features itself (what an orchestrator
  that treats each transfer run as an independent job pays);
- **cache, cold**: one call for the whole grid with an empty :class:`~trainers.features.FeatureCache`
  (features extracted once, then shared; what one transferlab transfer trial does);
- **cache, warm**: the same call again on the filled cache (a second study on the same storage).

Every way must give the same accuracy for every fit (asserted). Fine-tuning protocols (finetune,
lp_ft) train the whole network on images and read no frozen features (lp_ft only its initial
probe), so the cache does not change their cost; they are left out of the grid. Prints wall and
CPU seconds of each way (CPU time is the steadier figure on a shared machine). Run by hand;
figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from datasets_ import resolve_dataset
from datasets_.pipeline import iter_local_batches
from trainers.features import FeatureCache
from trainers.methods import build_pretrain_model
from trainers.models import model_config
from trainers.pretrain import save_checkpoint
from trainers.transfer import FULL, Fit, evaluate_transfer


def pretrain(out_dir: str, model: str, image_size: int, epochs: int, seed: int = 0) -> float:
    """A small supervised checkpoint on builtin:mnist's train split; returns seconds taken."""
    t0 = time.perf_counter()
    source = resolve_dataset("builtin:mnist")
    cfg = model_config(model)
    torch.manual_seed(seed)
    net = build_pretrain_model("supervised", cfg, source.num_classes, image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    net.train()
    for _ in range(epochs):
        for batch in iter_local_batches(source, "train", image_size, batch_size=64):
            loss = torch.nn.functional.cross_entropy(
                net(torch.from_numpy(batch["image"])), torch.from_numpy(batch["label"])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    meta = {
        "method": "supervised",
        "model_config": cfg,
        "num_classes": source.num_classes,
        "image_size": image_size,
        "classes": source.classes,
    }
    save_checkpoint(out_dir, net.eval(), meta)
    return time.perf_counter() - t0


def grid(protocols: list[str], shots: list, seeds: int) -> list[Fit]:
    """Every protocol × shots × seed; 'full' is fitted once (seed 0), as the study plan does."""
    return [Fit(p, s, seed) for p in protocols for s in shots for seed in (range(1) if s == FULL else range(seeds))]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time, summed over torch's
    threads, is what the grid costs; wall time also counts waiting for a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--shots", nargs="+", default=["1", "5", "10", FULL])
    ap.add_argument("--seeds", type=int, default=5, help="few-shot seeds 0..N-1")
    ap.add_argument("--protocols", nargs="+", default=["linear_probe", "logistic"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shots = [s if s == FULL else int(s) for s in args.shots]
    fits = grid(args.protocols, shots, args.seeds)
    task = resolve_dataset("builtin:digits")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/ckpt"
        os.makedirs(ckpt)
        pretrain_s = pretrain(ckpt, args.model, args.image_size, args.pretrain_epochs)
        cache = FeatureCache(f"{tmp}/feature_cache")
        (cold, cold_stats), cold_s, cold_cpu = timed(lambda: evaluate_transfer(ckpt, task, fits, cache=cache))
        (warm, warm_stats), warm_s, warm_cpu = timed(lambda: evaluate_transfer(ckpt, task, fits, cache=cache))
        nocache, nocache_s, nocache_cpu = timed(lambda: [evaluate_transfer(ckpt, task, [f])[0][0] for f in fits])

    acc = {
        name: np.array([r.metrics["accuracy"] for r in rs])
        for name, rs in (("cold", cold), ("warm", warm), ("nocache", nocache))
    }
    # Features are the model's float32 outputs on every path (the cache stores float32), so
    # every fit sees identical inputs: accuracies must match exactly.
    for name in ("warm", "nocache"):
        if not np.array_equal(acc["cold"], acc[name]):
            diff = np.flatnonzero(acc["cold"] != acc[name])
            raise AssertionError(
                f"accuracies differ between 'cache, cold' and '{name}' at fits {[fits[i] for i in diff]}"
            )
    figures = {
        "fits": len(fits),
        "pretrain_s": round(pretrain_s, 1),
        "no_cache_s": round(nocache_s, 1),
        "cache_cold_s": round(cold_s, 1),
        "cache_warm_s": round(warm_s, 1),
        "speedup_cold": round(nocache_s / cold_s, 1),
        "speedup_warm": round(nocache_s / warm_s, 1),
        "no_cache_cpu_s": round(nocache_cpu, 1),
        "cache_cold_cpu_s": round(cold_cpu, 1),
        "cache_warm_cpu_s": round(warm_cpu, 1),
        "cpu_speedup_cold": round(nocache_cpu / cold_cpu, 1),
        "cpu_speedup_warm": round(nocache_cpu / warm_cpu, 1),
        "extractions_no_cache": len(fits),
        "extractions_cold": cold_stats.feature_extractions,
        "cache_hits_warm": warm_stats.feature_cache_hits,
        "mean_accuracy": round(float(acc["cold"].mean()), 4),
    }
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
