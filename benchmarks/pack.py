"""Packed pretraining vs one TorchTrainer per run: pretraining models per hour (run by hand, not
in tests).

The grid is a reduced examples/role_of_data.yaml: both sources (mnist, glyphs), supervised with
label noise 0 / 0.2 / 0.4 and simclr, pretrain_size 500 and 2000 with epochs shrinking with size
as there (``--epochs-500``, ``--epochs-2000``), at its ``--quick`` model (tiny-cnn, 16 px).
``--methods clip`` runs the clip grid instead (both sources, both sizes: 4 runs). The same
study runs twice, ``pretrain.pack: auto`` and ``off``, each into a fresh sqlite store and
storage, on one private local Ray (4 logical CPUs, as ``transferlab run`` starts on 2 cores).
The pretraining wall time is the span from the first
pretraining run's start to the last one's end in MLflow; the transfer phase (one 1-shot probe
per run) is timed apart and not counted.

    PYTHONPATH=. python benchmarks/pack.py

Prints a Markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def study(pack: str, epochs_500: int, epochs_2000: int, methods: tuple[str, ...] = ("supervised", "simclr")) -> dict:
    sizes = [(500, epochs_500), (2000, epochs_2000)]
    grids = [
        {"method": ["supervised"], "pretrain_size": [n], "epochs": [e], "label_noise": [0.0, 0.2, 0.4]}
        for n, e in sizes
        if "supervised" in methods
    ]
    grids += [
        {"method": [m], "pretrain_size": [n], "epochs": [e]}
        for m in ("simclr", "clip")
        if m in methods
        for n, e in sizes
    ]
    return {
        "study": f"bench-pack-{pack}",
        "sources": {"mnist": {"uri": "builtin:mnist"}, "glyphs": {"uri": "builtin:glyphs"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {
            "model": "tiny-cnn",
            "image_size": 16,
            "batch_size": 64,
            "lr": 0.003,
            "pack": pack,
            "sweep": grids,
        },
        "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }


def pretraining_span(uri: str, name: str) -> tuple[int, float]:
    """(finished pretraining runs, seconds from the first one's start to the last one's end)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.records.schema import KIND_PRETRAIN, TAG_KIND

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'", max_results=1000)
    done = [r for r in runs if r.info.status == "FINISHED"]
    return len(done), (max(r.info.end_time for r in done) - min(r.info.start_time for r in done)) / 1000


def measure(
    pack: str, root: str, epochs_500: int, epochs_2000: int, methods: tuple[str, ...]
) -> tuple[int, float, float]:
    """(pretraining runs, their wall seconds, the whole study's seconds) of one mode."""
    from orchestrator.execution.study import run_study
    from orchestrator.spec import parse_spec

    spec = parse_spec(study(pack, epochs_500, epochs_2000, methods))
    uri = f"sqlite:///{root}/mlflow-{pack}.db"
    t0 = time.perf_counter()
    out = run_study(spec, tracking_uri=uri, storage_path=f"{root}/storage-{pack}")
    total = time.perf_counter() - t0
    assert not out.failed, out.failed
    n, span = pretraining_span(uri, spec.study)
    return n, span, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs-500", type=int, default=4)
    p.add_argument("--epochs-2000", type=int, default=1)
    p.add_argument("--modes", default="auto,off", help="which to run, in order")
    p.add_argument("--methods", default="supervised,simclr", help="the grid's methods (clip: its own grid)")
    args = p.parse_args()
    from orchestrator.execution.ray_connection import ray_session

    rows = ["| pretrain.pack | runs | pretraining wall | models/hour | study wall |", "|---|---|---|---|---|"]
    rates = {}
    # One private Ray with 4 logical CPUs for both modes (what `transferlab run` starts here).
    with ray_session(None, num_cpus=4), tempfile.TemporaryDirectory() as root:
        for mode in args.modes.split(","):
            n, span, total = measure(mode, root, args.epochs_500, args.epochs_2000, tuple(args.methods.split(",")))
            rates[mode] = 3600 * n / span
            rows.append(f"| {mode} | {n} | {span:.1f} s | {rates[mode]:.0f} | {total:.1f} s |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if {"auto", "off"} <= set(rates):
        print(f"\npacked / one TorchTrainer per run: {rates['auto'] / rates['off']:.1f}x models per hour")
    print(f"load average after: {os.getloadavg()[0]:.2f}, {os.getloadavg()[1]:.2f}, {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
