"""The control plane at LAION-like sample counts: ``data prepare`` and ``plan`` of a raw Parquet
source of N tiny images (unique keys and captions, 100 classes).

    python benchmarks/plan_scale.py --n 100000 1000000 [--baseline-repo DIR]

For each N: writes the raw source (files of 100,000 rows; 8×8 PNGs drawn from 1,000 distinct
ones), then times, each in a fresh process whose peak RSS is read from ``wait4``:

- ``transferlab data prepare SRC --out DS`` (Parquet shards of 2,000 rows);
- ``transferlab plan`` of a 6-run grid over DS (2 sizes × 3 label-noise levels, one seed), cold
  (no cached view statistics) and warm (cached);
- with ``--baseline-repo`` (a checkout of an earlier commit), the same cold ``plan`` with that
  code, side by side.

Prints one Markdown row per step: N, step, wall seconds, peak RSS (MB), and the load average.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS_PER_FILE = 100_000
CLASSES = 100


def write_source(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(1000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    root.mkdir(parents=True)
    for start in range(0, n, ROWS_PER_FILE):
        idx = np.arange(start, min(n, start + ROWS_PER_FILE))
        labels = idx % CLASSES
        table = pa.table(
            {
                "key": [f"sample-{i:09d}" for i in idx],
                "image": [pngs[i % 1000] for i in idx],
                "label": labels,
                "caption": [f"a photo of item {i} of kind {c}" for i, c in zip(idx, labels)],
            }
        )
        pq.write_table(table, root / f"part-{start // ROWS_PER_FILE:05d}.parquet")


STUDY = """study: plan-scale
sources: {{big: {{uri: "{uri}"}}}}
tasks: {{digits: {{uri: "builtin:digits"}}}}
pretrain:
  model: small-cnn
  sweep: {{source: [big], pretrain_size: [{small}, {large}], label_noise: [0.0, 0.2, 0.4], seed: [0]}}
transfer: {{protocol: [linear_probe], shots: [1, full], seeds: [0]}}
tracking_uri: "sqlite:///{db}"
"""


def timed(cmd: list[str], env: dict, cwd: Path = REPO) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command in a fresh process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--baseline-repo", type=Path, help="a checkout of the code to compare plan with")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="plan-scale-"))
    env = {**os.environ, "TRANSFERLAB_CACHE": str(work / "cache"), "RAY_AUTH_MODE": "disabled"}
    subprocess.run([BIN / "transferlab", "data", "inspect", "builtin:digits"], env=env, check=True, capture_output=True)
    print("| N | step | wall (s) | peak RSS (MB) | load (1 min) |\n|---|---|---|---|---|")
    for n in args.n:
        src, ds = work / f"src-{n}", work / f"ds-{n}"
        if not src.exists():
            write_source(src, n)
        shutil.rmtree(ds, ignore_errors=True)

        def row(step: str, wall: float, rss: float, n: int = n) -> None:
            print(f"| {n:,} | {step} | {wall:.1f} | {rss:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)

        row("data prepare", *timed([str(BIN / "transferlab"), "data", "prepare", str(src), "--out", str(ds)], env))
        spec = work / f"study-{n}.yaml"
        spec.write_text(STUDY.format(uri=ds, small=n // 10, large=n // 2, db=work / "mlflow.db"))
        plan = [str(BIN / "transferlab"), "plan", str(spec)]
        shutil.rmtree(work / "cache" / "view-stats", ignore_errors=True)
        row("plan (cold)", *timed(plan, env))
        row("plan (warm: cached view statistics)", *timed(plan, env))
        if args.baseline_repo:
            base_env = {**env, "PYTHONPATH": str(args.baseline_repo)}
            cmd = [sys.executable, "-m", "orchestrator.cli", "plan", str(spec)]
            row(f"plan, baseline ({args.baseline_repo.name})", *timed(cmd, base_env, cwd=args.baseline_repo))


if __name__ == "__main__":
    main()
