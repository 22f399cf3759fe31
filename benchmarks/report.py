"""Benchmark ``transferlab report`` on a large synthetic study, and how fast its HTML opens.

    python benchmarks/report.py --runs 5000 --baseline /path/to/older/checkout

Writes a study of about ``--runs`` runs into a fresh sqlite MLflow store (the same schema
``transferlab run`` writes: class masks on every pretraining run, per-example outputs on the
full-data transfer runs; ``--keep-study`` reuses one already written there), then times the
``transferlab report`` command end to end, round by round: ``cold`` (an empty report cache, as on
a first report), ``warm`` (the same command again, nothing changed: the kept report served) and,
with ``--baseline``, the same two commands run from another checkout of transferlab (its folder
put first on PYTHONPATH, its own empty cache) in the same round, so that the shared machine's
load hits all alike. Prints each time, the medians over rounds and the load average around each round; then
opens the report in headless chromium: the page records ``performance.now()`` at its load event
(``data-load-ms`` on <body>), read back with ``--dump-dom``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synthetic_runs import SyntheticStudy, per_example_frame

SHOTS = (1, 5, 10, 25)
TRANSFER_SEEDS = 4
LAYERS = ("penultimate", "last")
CLASSES = [str(c) for c in range(10)]


def write_study(uri: str, root: Path, runs: int, threads: int) -> tuple[int, float]:
    """About ``runs`` runs: 3 sources × 4 sizes × 2 noise levels × seeds, 19 transfer runs each."""
    per_pretrain = 1 + len(SHOTS) * TRANSFER_SEEDS + len(LAYERS)
    s = SyntheticStudy(uri, "bench", root / "artifacts")
    grid = [
        (src, shift, size, noise)
        for src, shift in (("mnist", 1.0), ("emnist", 3.0), ("kmnist", 0.5))
        for size in (1000, 4000, 16000, 64000)
        for noise in (0.0, 0.4)
    ]
    n_pre = max(len(grid), round((runs - 1) / per_pretrain))
    jobs = [(*grid[i % len(grid)], i // len(grid)) for i in range(n_pre)]

    def one(job):
        src, shift, size, noise, seed = job
        rng = np.random.default_rng([len(src), int(shift * 10), size, int(noise * 10), seed])
        included = rng.permutation(10) < 5
        base = (
            0.95
            - 0.7 * (size * shift * (0.5 if noise else 1.0) * (0.8 + 0.4 * included[3] - 0.3 * included[7])) ** -0.25
        )
        pre = s.pretrain(
            src,
            size,
            upstream=float(base + rng.normal(0, 0.02)),
            noise=noise,
            seed=seed,
            classes=CLASSES,
            included=included.tolist(),
        )
        for shots in SHOTS:
            for t_seed in range(TRANSFER_SEEDS):
                s.transfer(pre, "digits", shots, t_seed, float(base - 0.25 / np.sqrt(shots) + rng.normal(0, 0.01)))
        for layer in LAYERS:
            p = np.clip(base + rng.normal(0, 0.1, 200) - (0.03 if layer == "penultimate" else 0), 0, 1)
            s.transfer(pre, "digits", "full", 0, float(p.mean()), layer=layer, per_example=per_example_frame(p))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, jobs))
    return 1 + n_pre * per_pretrain, time.perf_counter() - t0


def chromium_load(html: Path) -> tuple[int, float]:
    """(load-event time in ms as the page measured it, wall seconds of the headless chromium call)."""
    exe = next(p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p)
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            exe,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--virtual-time-budget=10000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    wall = time.perf_counter() - t0
    return int(re.search(r'data-load-ms="(\d+)"', out).group(1)), wall


def timed_report(uri: str, out: Path, code: Path, cache: Path) -> float:
    """Wall seconds of ``transferlab report bench`` in a fresh process, run from checkout ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code), "TRANSFERLAB_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "report", "bench", "--tracking-uri", uri, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--dir", default="/tmp/transferlab-bench-report")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each: baseline cold and warm, cold, warm)")
    ap.add_argument("--baseline", default=None, help="another checkout of transferlab, timed alongside")
    ap.add_argument("--keep-study", action="store_true", help="reuse the study already written under --dir")
    args = ap.parse_args()
    root = Path(args.dir)
    uri = f"sqlite:///{root}/mlflow.db"
    if not (args.keep_study and (root / "mlflow.db").exists()):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        n, secs = write_study(uri, root, args.runs, args.threads)
        print(f"wrote {n} runs in {secs:.0f}s")
    here = Path(__file__).resolve().parents[1]
    times: dict[str, list[float]] = {}
    for i in range(args.repeats):
        load = os.getloadavg()[0]
        cache = root / f"cache-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        row = {}
        if args.baseline:
            base = Path(args.baseline)
            row["baseline cold"] = timed_report(uri, root / "report-baseline", base, cache / "baseline")
            row["baseline warm"] = timed_report(uri, root / "report-baseline", base, cache / "baseline")
        row["cold"] = timed_report(uri, root / "report", here, cache)
        row["warm"] = timed_report(uri, root / "report", here, cache)
        for k, v in row.items():
            times.setdefault(k, []).append(v)
        print(
            f"round {i + 1}: " + "; ".join(f"{k} {v:.1f}s" for k, v in row.items())
            + f" (load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores)"
        )  # fmt: skip
    med = {k: float(np.median(v)) for k, v in times.items()}
    print("medians: " + "; ".join(f"{k} {v:.1f}s" for k, v in med.items()))
    if "baseline cold" in med:
        print(
            f"baseline cold/cold {med['baseline cold'] / med['cold']:.2f}x; "
            f"baseline warm/warm {med['baseline warm'] / med['warm']:.1f}x"
        )
    html = root / "report" / "report.html"
    if any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))):
        load_ms, chrome_wall = chromium_load(html)
        print(
            f"report.html {html.stat().st_size / 1e6:.2f} MB, "
            f"{len(list((root / 'report' / 'figures').glob('*.png')))} figures; chromium load event {load_ms} ms "
            f"(headless chromium call incl. browser start {chrome_wall:.2f}s)"
        )


if __name__ == "__main__":
    main()
