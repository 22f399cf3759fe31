"""Which pending pretraining runs train together, several at once in one trial (``pretrain.pack``).

A TorchTrainer costs seconds of start-up and its own worker processes whatever the model; a
*pack* trains several small runs of one model shape stacked in one plain Tune trial
(:mod:`trainers.packed`), each exactly as if alone. Packing is how, not what: a run's config and
content hash are the same packed or not, so either kind of result serves the other.

With ``pretrain.pack: auto`` (the default) a pending run is packed when all of these hold:

- its method is supervised, simclr or clip (:data:`trainers.packed.PACKABLE_METHODS`), ``amp:
  none``, its source has no caption filter, and it has no ``caption_noise`` (clip runs whose
  captions are swapped keep their TorchTrainer, whose decoded batches draw the swaps);
- ``resources.workers`` is 1 (multi-worker runs keep their TorchTrainer);
- its model has at most :data:`PACK_MAX_PARAMS` parameters;
- its source's training split, decoded at ``image_size`` (N · 3 · S² bytes, held by the trial),
  fits ``TRANSFERLAB_MAX_HELD_IMAGE_BYTES`` (default 2 GiB, as transfer trials use).

Runs that share a source and :func:`trainers.packed.pack_key` (method, model, classes, image and
batch size) form a group; each group is cut into packs of at most :data:`PACK_MAX_RUNS` runs.
While there are fewer packs than pretraining trials run at once (``slots``), the largest pack is
halved, so packing leaves no slot idle that one TorchTrainer per run would have used; beyond
that, packs stay as large as they can, since every trial pays its process's start-up (torch's
lazy imports on the first vmapped gradient, the split's decoding) once. ``off``: every run gets its own
TorchTrainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from datasets_.pipeline import may_hold_decoded
from orchestrator.planning.pretrain_runs import PretrainRun
from trainers.packed import PACKABLE_METHODS, pack_key, parameter_count

PACK_MAX_PARAMS = 5_000_000
PACK_MAX_RUNS = 16


@dataclass(frozen=True)
class Pack:
    """Runs trained in one trial; ``key`` names the trial (stable for the same runs)."""

    runs: tuple[PretrainRun, ...]

    @property
    def key(self) -> str:
        return f"pack-{self.runs[0].config_hash[:12]}-{len(self.runs)}"

    @property
    def label(self) -> str:
        r = self.runs[0]
        return f"pack of {len(self.runs)}: {r.settings.method} {r.source} ({r.run_name}, ...)"


def packable(run: PretrainRun, workers: int, train_samples: int) -> bool:
    """Whether ``pack: auto`` packs ``run`` (the rules of the module docstring)."""
    c = run.config
    return (
        c.method in PACKABLE_METHODS
        and c.amp == "none"
        and not run.view.needs_captions
        and run.view.caption_noise == 0
        and workers == 1
        and parameter_count(c) <= PACK_MAX_PARAMS
        and may_hold_decoded(train_samples, c.image_size)
    )


def plan_packs(
    runs: list[PretrainRun], mode: str, workers: int, train_samples: dict[str, int], slots: int
) -> tuple[list[Pack], list[PretrainRun]]:
    """(packs, runs that keep their own TorchTrainer) of the pending ``runs``; ``train_samples``
    is each source's training split size, ``slots`` the pretraining trials run at once."""
    if mode == "off":
        return [], list(runs)
    groups: dict[tuple, list[PretrainRun]] = {}
    alone = []
    for r in runs:
        if packable(r, workers, train_samples[r.source]):
            groups.setdefault((r.source, *pack_key(r.config)), []).append(r)
        else:
            alone.append(r)
    packs = []
    for members in groups.values():
        n = math.ceil(len(members) / PACK_MAX_RUNS)
        packs += [members[i::n] for i in range(n)]
    while len(packs) < slots and max(map(len, packs), default=1) > 1:  # fill the slots: halve the largest
        big = max(packs, key=len)
        packs.remove(big)
        packs += [big[0::2], big[1::2]]
    return [Pack(tuple(p)) for p in packs], alone
