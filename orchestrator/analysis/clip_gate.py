"""Claims about CLIP are judged only on CLIP models that learned.

A CLIP model whose zero-shot accuracy on its own source's held-out split is near chance has not
learned an image-text embedding; what transfers from it says nothing about CLIP pretraining. So
a claim row whose evidence includes ``clip`` pretraining runs of a source whose mean zero-shot
``upstream_accuracy`` (over its CLIP pretraining runs) is below :data:`CLIP_LEARNED` is
``inconclusive``, with the note "CLIP did not learn: zero-shot upstream accuracy X < 0.5 (source)".
Sources whose CLIP runs have no upstream accuracy recorded are not gated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.analysis.stats import INCONCLUSIVE
from orchestrator.records.schema import METRIC_UPSTREAM_ACCURACY

CLIP_LEARNED = 0.5  # zero-shot top-1 on the source's held-out split
EVIDENCE = "evidence"  # the key of a claim row's (method, source) pairs; not a column of the rows


def evidence_pairs(t: pd.DataFrame) -> frozenset[tuple[str, str]]:
    """The (method, source) pairs of the runs in a transfer frame: what a claim row rests on."""
    if t.empty or "method" not in t or "source" not in t:
        return frozenset()
    return frozenset(zip(t["method"].astype(str), t["source"].astype(str)))


def unlearned_clip_sources(t: pd.DataFrame) -> dict[str, float]:
    """source -> mean zero-shot upstream accuracy of its CLIP pretraining runs, for the sources
    where it is below :data:`CLIP_LEARNED` (each pretraining run counted once)."""
    if t.empty or METRIC_UPSTREAM_ACCURACY not in t or "method" not in t:
        return {}
    clip = t[t["method"] == "clip"].drop_duplicates("pretrain_run_id")
    means = clip.groupby("source")[METRIC_UPSTREAM_ACCURACY].mean()
    return {str(s): float(a) for s, a in means.items() if np.isfinite(a) and a < CLIP_LEARNED}


def gate_clip_rows(rows: list[dict], unlearned: dict[str, float]) -> list[dict]:
    """``rows`` with every row whose :data:`EVIDENCE` includes an unlearned CLIP source made
    inconclusive, its ``interval`` saying why (rows without evidence pairs are kept as they are)."""
    out = []
    for row in rows:
        failed = sorted(s for m, s in row.get(EVIDENCE, ()) if m == "clip" and s in unlearned)
        if failed:
            said = ", ".join(f"{unlearned[s]:.2f} ({s})" for s in failed)
            row = {
                **row,
                "verdict": INCONCLUSIVE,
                "interval": f"CLIP did not learn: zero-shot upstream accuracy {said} < {CLIP_LEARNED:g}",
            }
        out.append(row)
    return out
