"""Reading a study's results back from MLflow: one row per finished transfer run, and the
compact accuracy table that ``transferlab run`` and ``transferlab runs`` print."""

from __future__ import annotations

import pandas as pd

from orchestrator.records.schema import FINISHED, KIND_PRETRAIN, KIND_TRANSFER, TAG_CONFIG_HASH, TAG_PARENT
from orchestrator.records.tracker import Tracker, run_per_config
from trainers.protocols import FULL


def transfer_frame(tracker: Tracker, study: str) -> pd.DataFrame:
    """Finished transfer runs joined with their pretraining run's params and upstream accuracy."""
    exp = tracker.experiment_id(study, create=False)
    if exp is None:
        return pd.DataFrame()
    # One run per job (run_per_config); a transfer run whose parent is a duplicate of its
    # pretraining job is shown under the run that stands for that job.
    pre_runs = tracker.runs(exp, KIND_PRETRAIN)
    kept = run_per_config(pre_runs)
    pre = {r.info.run_id: kept.get(r.data.tags.get(TAG_CONFIG_HASH), r) for r in pre_runs}
    rows = []
    for r in run_per_config(tracker.runs(exp, KIND_TRANSFER)).values():
        if r.info.status != FINISHED:
            continue
        parent = pre.get(r.data.tags.get(TAG_PARENT))
        if parent is None:
            continue
        p = parent.data.params
        rows.append(
            {
                "pretrain": parent.info.run_name,
                "method": p.get("method"),
                "source": p.get("source"),
                "pretrain_size": p.get("pretrain_size"),
                "label_noise": float(p.get("label_noise", "nan")),
                "model": p.get("model"),
                "pretrain_seed": p.get("seed"),
                "upstream_accuracy": parent.data.metrics.get("upstream_accuracy"),
                **{k: r.data.params.get(k) for k in ("task", "protocol", "shots", "seed", "layer")},
                **r.data.metrics,
            }
        )
        layer = rows[-1]["layer"]
        if layer not in (None, "final"):  # layer-wise probes are rows of their own
            rows[-1]["protocol"] = f"{rows[-1]['protocol']}@{layer}"
    return pd.DataFrame(rows)


def _shots_order(value: str) -> tuple[int, int]:
    return (1, 0) if value == FULL else (0, int(value))


def _size_order(value: str) -> float:
    return float("inf") if value == FULL else float(value)


def results_table(df: pd.DataFrame) -> str:
    """Pretrain config × shots → test accuracy (%) as mean ±std over seeds."""
    if df.empty:
        return "(no finished transfer runs yet)"
    shots = sorted(df["shots"].unique(), key=_shots_order)
    keys = ["pretrain", "task", "protocol"]
    grouped = df.groupby(keys + ["shots"])["accuracy"].agg(["mean", "std", "count"])
    first = df.drop_duplicates("pretrain").set_index("pretrain")
    rows = []
    for (pretrain, task, protocol), _ in df.groupby(keys):
        cells = []
        for k in shots:
            if (pretrain, task, protocol, k) not in grouped.index:
                cells.append("-")
                continue
            g = grouped.loc[(pretrain, task, protocol, k)]
            cell = f"{100 * g['mean']:.1f}"
            if g["count"] > 1:
                cell += f" ±{100 * g['std']:.1f}"
            cells.append(cell)
        up = first.loc[pretrain, "upstream_accuracy"]
        rows.append([pretrain, f"{100 * up:.1f}" if pd.notna(up) else "-", task, protocol, *cells])
    rows.sort(
        key=lambda r: (
            first.loc[r[0], "source"],
            _size_order(first.loc[r[0], "pretrain_size"]),
            first.loc[r[0], "label_noise"],
            r[0],
            r[2],
            r[3],
        )
    )
    header = ["pretrain", "upstream", "task", "protocol", *[(FULL if k == FULL else f"{k}-shot") for k in shots]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(r):
        return "  ".join(str(x).ljust(w) if i < 4 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))

    n_seeds = int(df[df["shots"] != FULL].groupby(keys + ["shots"]).size().max()) if (df["shots"] != FULL).any() else 1
    lines = [
        f"Test accuracy (%) on the downstream task; few-shot cells are mean ±std over {n_seeds} seed(s); upstream = "
        "held-out source accuracy (%): "
        "top-1 for supervised, zero-shot top-1 for clip, k-NN top-1 for simclr.",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *[fmt(r) for r in rows],
    ]
    return "\n".join(lines)
