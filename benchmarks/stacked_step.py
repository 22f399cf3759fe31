"""Packed pretraining on the CPU: the pack's steps vmapped into one vs run model after model
(run by hand, not in tests).

``trainers.packed.train_packed`` trains a pack of runs with ``vectorize=True`` (one vmapped
``torch.func`` step for the B models, the accelerator's default) or ``vectorize=False`` (each
model's step in turn on views of the stacked tensors, its images channels-last: the CPU's
default since 6 Dec 2026). Both give the same models up to float rounding (tests/test_packed.py).
This times one epoch of a pack of ``--pack`` runs on random images, the two arms taking turns
for ``--rounds`` rounds (a noisy neighbour hits both alike), one torch thread as a packed trial
has, and prints a Markdown table of medians and per-round ratios.

    PYTHONPATH=. python benchmarks/stacked_step.py                       # small-cnn 28 px, as role_of_data
    PYTHONPATH=. python benchmarks/stacked_step.py --model tiny-cnn --image-size 16 --pack 15
    PYTHONPATH=. python benchmarks/stacked_step.py --methods clip --images 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from datasets_.views import PretrainView
from trainers.models import model_config
from trainers.packed import DecodedSplit, train_packed
from trainers.pretrain import PretrainConfig

CLASSES = 10


def split(n: int, size: int, seed: int) -> DecodedSplit:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    labels = rng.integers(0, CLASSES, n)
    captions = [f"a {('thin', 'bold')[i % 2]} character {y}." for i, y in enumerate(labels)]
    return DecodedSplit(images, labels, np.array([f"s{seed}-{i}" for i in range(n)]), captions)


def pack(method: str, model: str, size: int, b: int) -> list[PretrainConfig]:
    return [
        PretrainConfig(
            method=method,
            model_config=model_config(model),
            num_classes=CLASSES,
            classes=tuple(str(c) for c in range(CLASSES)),
            image_size=size,
            epochs=1,
            batch_size=64,
            lr=0.003,
            weight_decay=5e-4,
            lr_schedule="cosine",
            warmup_epochs=0.0,
            amp="none",
            seed=s,
            num_train_samples=0,
        )
        for s in range(b)
    ]


def timed(configs, train, held, vectorize: bool) -> float:
    views = [PretrainView("fp", None, 0.0, c.seed, CLASSES, 1.0) for c in configs]
    t0 = time.perf_counter()
    train_packed(configs, views, [None] * len(configs), train, held, vectorize=vectorize)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--pack", type=int, default=8, help="runs in the pack")
    p.add_argument("--images", type=int, default=1024, help="training images (one epoch of each run)")
    p.add_argument("--methods", nargs="+", default=["supervised", "simclr"])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    train, held = split(a.images, a.image_size, 0), split(128, a.image_size, 1)
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print("| method | pack | vmapped (s) | in turn, channels-last (s) | ratio per round |")
    print("|---|---|---|---|---|")
    for method in a.methods:
        configs = pack(method, a.model, a.image_size, a.pack)
        timed(configs[:1], split(64, a.image_size, 2), held, False)  # torch's lazy imports, once
        vm, loop = [], []
        for _ in range(a.rounds):
            vm.append(timed(configs, train, held, True))
            loop.append(timed(configs, train, held, False))
        ratios = ", ".join(f"{x / y:.2f}x" for x, y in zip(vm, loop))
        print(
            f"| {method} | {a.pack} x {a.model} {a.image_size} px | {statistics.median(vm):.1f} "
            f"| {statistics.median(loop):.1f} | {ratios} |",
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
