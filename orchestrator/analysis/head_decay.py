"""The head weight-decay claim of Abnar et al.: a stronger decay on the classifier head raises
upstream accuracy but lowers downstream accuracy, so the two disagree.

Runs are paired when every pretraining setting but ``head_weight_decay`` is equal and they share
their pretraining seed; each pair gives one upstream difference and, per task, one downstream
difference (the mean over the few-shot draws, which every checkpoint shares, so their luck
cancels within a pair). The pairs are independent trainings: t-intervals over them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.analysis.clip_gate import evidence_pairs
from orchestrator.analysis.frame import PRETRAIN_SEED
from orchestrator.analysis.stats import TOO_FEW, Interval, t_interval
from orchestrator.analysis.tables import ACC, final_layer
from orchestrator.records.schema import METRIC_UPSTREAM_ACCURACY
from orchestrator.spec.claims import ClaimSpec

HEAD = "head_weight_decay"


def paired_differences(t: pd.DataFrame, low: float, high: float, pair_keys: list[str]) -> pd.DataFrame:
    """One row per (pair key values, pretraining seed) holding both decays: ``up`` =
    upstream(high) − upstream(low) and ``down`` = mean accuracy(high) − mean accuracy(low) over
    ``t``'s rows (one task and shots setting)."""
    t = t.assign(_hwd=pd.to_numeric(t[HEAD], errors="coerce"))
    t = t[t["_hwd"].isin([low, high])]
    keys = [*pair_keys, PRETRAIN_SEED]
    per_run = t.groupby([*keys, "_hwd"], dropna=False).agg(up=(METRIC_UPSTREAM_ACCURACY, "first"), down=(ACC, "mean"))
    wide = per_run.unstack("_hwd")
    if (("up", high) not in wide) or (("up", low) not in wide):
        return pd.DataFrame(columns=["up", "down"])
    out = pd.DataFrame({v: wide[(v, high)] - wide[(v, low)] for v in ("up", "down")})
    return out.dropna()


def _interval(values: np.ndarray) -> Interval:
    iv = t_interval(values)
    return Interval(iv.estimate, iv.ci_low, iv.ci_high, iv.n, "t over pairs" if iv.judged else TOO_FEW)


def head_decay_disagreement(t: pd.DataFrame, c: ClaimSpec, config_keys: tuple, make_row) -> list[dict]:
    """Rows of the claim: upstream (expect +), then downstream per task (expect −).
    ``config_keys``: the columns naming a configuration; ``make_row``: the claim row builder."""
    if HEAD not in t:
        return []
    t = final_layer(t)
    low, high = float(c.get("low")), float(c.get("high"))
    pair_keys = [k for k in config_keys if k in t and k != HEAD]
    few = t[np.isfinite(t["shots_n"])]
    shots = str(c.get("shots")) if c.get("shots") is not None else str(few.sort_values("shots_n")["shots"].iloc[0])
    tasks = [c.get("task")] if c.get("task") is not None else sorted(t["task"].unique())
    rows, ups = [], None
    for task in tasks:
        g = t[(t["task"] == task) & (t["shots"] == shots)]
        d = paired_differences(g, low, high, pair_keys)
        if ups is None:
            ups = d["up"].to_numpy(float)
            rows.append(
                make_row(
                    c.name,
                    f"upstream, head decay {high:g} vs {low:g}",
                    "upstream(high) − upstream(low), paired",
                    _interval(ups),
                    +1,
                    evidence=evidence_pairs(g),
                )
            )
        rows.append(
            make_row(
                c.name,
                f"{task}, {shots} shot(s)",
                "downstream(high) − downstream(low), paired",
                _interval(d["down"].to_numpy(float)),
                -1,
                evidence=evidence_pairs(g),
            )
        )
    return rows
