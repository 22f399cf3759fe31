"""``claims:`` — the hypotheses a study is run to decide, declared before its results exist.

Each claim is a mapping ``{kind: KIND, name: optional label, PARAM: value ...}``; the kinds,
their parameters, defaults and meanings are declared once, in :data:`CLAIM_KINDS`. A parameter
that names a source, task, layer, shots setting or label-noise level must name one of this study's
(``claims[1].source: 'foo' is not a source of this study``). ``transferlab report`` evaluates each
claim (orchestrator.analysis.claims) and says reproduced / not reproduced / inconclusive; without
a ``claims:`` section it evaluates the kinds that apply to the study's grid at their defaults.

An example::

    claims:
      - {kind: source_advantage, task: digits, source: mnist, other: glyphs}
      - {kind: noisy_larger_noninferior, margin: 0.02}
      - {kind: saturation, task: digits}
      - {kind: best_layer_differs, near: letters, far: digits, layer: block2}
      - {kind: class_influence, task: digits, class: handwritten-7}
      - {kind: counterfactual_removal, arm: harmful}

A ``class`` is checked only for being a non-empty string: a source's class names are known from its
data, not from the study file; the report says when a class is not among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.spec.fields import Mapping, SpecError, choice, integer, number, short, string, typename
from trainers.protocols import FINAL_LAYER

EXPECT = ("positive", "negative")
REMOVAL_ARMS = ("harmful", "helpful")  # the arms a counterfactual_removal claim is about
VERSUS = ("baseline", "random")  # what an arm is compared with


@dataclass(frozen=True)
class Param:
    """One parameter of a claim kind. ``ref``: what it names in the study (task, source, layer,
    shots, label_noise), or None for a plain value read by ``ref_kind``; ``default`` None means
    'every one the grid has' (or, for ``shots``, the fewest few-shot setting)."""

    ref: str  # task | source | layer | shots | label_noise | head_weight_decay | margin | expect | class | arm | k
    # | versus
    default: Any = None
    required: bool = False
    doc: str = ""


def _p(ref: str, doc: str, default: Any = None, required: bool = False) -> Param:
    return Param(ref, default, required, doc)


_EXPECT = _p("expect", "the predicted sign of the statistic: positive | negative", "positive")

# kind -> (what it claims, {param: Param})
CLAIM_KINDS: dict[str, tuple[str, dict[str, Param]]] = {
    "source_advantage": (
        "An in-domain source helps more at few shots than with full data (Entezari et al.): "
        "[acc(source) − acc(other)] at `shots` minus the same at full, each source at its largest clean set.",
        {
            "task": _p("task", "the downstream task", required=True),
            "source": _p("source", "the in-domain source", required=True),
            "other": _p("source", "the source it is compared with", required=True),
            "shots": _p("shots", "the few-shot setting (default: the fewest)"),
            "expect": _EXPECT,
        },
    ),
    "size_helps_few_shot_more": (
        "More pretraining data helps few-shot more than full (Entezari et al.): the gain from the smallest "
        "to the largest clean pretraining set at `shots` minus that gain at full.",
        {
            "task": _p("task", "the downstream task (default: each)"),
            "source": _p("source", "the pretraining source (default: each)"),
            "shots": _p("shots", "the few-shot setting (default: the fewest)"),
            "expect": _EXPECT,
        },
    ),
    "noisy_larger_noninferior": (
        "A larger noisy pretraining set is not worse than a smaller clean one (Entezari et al.): "
        "acc(largest set, noise p) − acc(next smaller clean set) at `shots`; reproduced when its 95% "
        "interval lies above −margin, not reproduced when it lies below −margin.",
        {
            "task": _p("task", "the downstream task (default: each)"),
            "source": _p("source", "the pretraining source (default: each)"),
            "label_noise": _p("label_noise", "the noise level p > 0 (default: each)"),
            "shots": _p("shots", "the shots setting (default: the fewest)"),
            "margin": _p("margin", "the loss of accuracy still called non-inferior", 0.02),
        },
    ),
    "saturation": (
        "Downstream error saturates (Abnar et al.): e_IR > 0 in e_DS = k·e_US^α + e_IR fitted on the upper "
        "hull of the configurations' mean accuracies, with a profile-likelihood interval.",
        {
            "task": _p("task", "the downstream task (default: each)"),
            "shots": _p("shots", "the shots setting (default: each)"),
            "expect": _EXPECT,
        },
    ),
    "e_ir_falls_with_shots": (
        "The irreducible error falls with more shots (Abnar et al.): e_IR(fewer_shots) − e_IR(more_shots).",
        {
            "task": _p("task", "the downstream task (default: each)"),
            "fewer_shots": _p("shots", "default: the fewest shots"),
            "more_shots": _p("shots", "default: the most shots (full if the study has it)"),
            "expect": _EXPECT,
        },
    ),
    "best_layer_differs": (
        "An earlier layer is relatively better on the far task than on the near one (Abnar et al.): "
        "[acc(layer) − acc(final)] on `far` minus the same on `near`, per configuration; the layer is "
        "named here, before the results, never chosen on them.",
        {
            "near": _p("task", "the task near the pretraining data", required=True),
            "far": _p("task", "the task far from it", required=True),
            "layer": _p("layer", "the earlier layer", required=True),
            "final": _p("layer", "the layer it is compared with", FINAL_LAYER),
            "shots": _p("shots", "the shots setting (default: the fewest)"),
            "expect": _EXPECT,
        },
    ),
    "head_decay_disagreement": (
        "A stronger weight decay on the classifier head raises upstream accuracy but lowers downstream "
        "accuracy (Abnar et al.): per configuration and pretraining seed, upstream(high) − upstream(low) "
        "(predicted positive) and, per task, downstream(high) − downstream(low) at `shots` (predicted "
        "negative), the runs paired by every other setting and the seed; t-intervals over the pairs.",
        {
            "low": _p("head_weight_decay", "the weaker head decay (a head_weight_decay of the sweep)", required=True),
            "high": _p("head_weight_decay", "the stronger head decay", required=True),
            "task": _p("task", "the downstream task (default: each)"),
            "shots": _p("shots", "the shots setting (default: the fewest)"),
        },
    ),
    "class_influence": (
        "A named source class helps (or, expect: negative, harms) the task (Jain et al.): its influence, "
        "the mean output on the task of the models that trained on it minus that of the models that did not, "
        "with a Welch interval; beside it, per example, how many examples the class is significant on "
        "family-wise (p_family < 0.01) and its top-influencer count with that count's permutation p. "
        "The class is named here, before the results, never chosen on them.",
        {
            "task": _p("task", "the downstream task", required=True),
            "source": _p("source", "the source whose class it is (default: each with influence inputs)"),
            "class": _p("class", "the source class", required=True),
            "expect": _EXPECT,
        },
    ),
    "counterfactual_removal": (
        "Removing the K most harmful classes raises target accuracy, removing the K most helpful lowers it "
        "(Jain et al.): acc(without the arm's K classes) − acc(baseline, or random K), per pretraining seed of "
        "the counterfactual follow-up, paired by seed.",
        {
            "arm": _p("arm", "harmful | helpful", required=True),
            "k": _p("k", "classes removed, K >= 1 (default: each K planned)"),
            "versus": _p("versus", "baseline (all classes) | random (as many random classes)", "baseline"),
            "expect": _p("expect", "positive | negative (default: positive for harmful, negative for helpful)", None),
        },
    ),
}


@dataclass(frozen=True)
class ClaimSpec:
    """One pre-registered claim: its kind, a label, and every parameter of the kind (defaults
    filled in; None = every one the grid has)."""

    kind: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str) -> Any:
        return dict(self.params)[key]

    @property
    def expect(self) -> int:
        """+1 when the statistic is predicted positive, -1 when negative."""
        return -1 if dict(self.params).get("expect") == "negative" else +1


def _arm_expect(kind: str, values: dict) -> dict:
    """A counterfactual_removal claim without ``expect`` predicts what Jain et al. do: removing
    harmful classes raises accuracy (positive), removing helpful ones lowers it (negative)."""
    if kind == "counterfactual_removal" and values.get("expect") is None:
        values["expect"] = "negative" if values["arm"] == "helpful" else "positive"
    return values


def default_claim(kind: str, **params: Any) -> ClaimSpec:
    """A claim of ``kind`` at its defaults (``params`` override), named by kind and params."""
    values = _arm_expect(kind, {k: params.get(k, p.default) for k, p in CLAIM_KINDS[kind][1].items()})
    given = ", ".join(f"{k}={v}" for k, v in params.items())
    return ClaimSpec(kind, f"{kind} ({given})" if given else kind, tuple(values.items()))


@dataclass(frozen=True)
class StudyNames:
    """What a claim's parameters may name: the study's tasks, sources, layers, shots, noise levels."""

    task: tuple
    source: tuple
    layer: tuple
    shots: tuple
    label_noise: tuple
    head_weight_decay: tuple = ()


def _reader(ref: str, names: StudyNames):
    def read(path: str, v: Any) -> Any:
        if ref == "expect":
            return choice(EXPECT)(path, v)
        if ref == "margin":
            return number(path, v, lo=0.0, hi=1.0)
        if ref == "class":
            return string(path, v)
        if ref == "arm":
            return choice(REMOVAL_ARMS)(path, v)
        if ref == "versus":
            return choice(VERSUS)(path, v)
        if ref == "k":
            return integer(path, v, minimum=1)
        if ref == "label_noise":
            v = number(path, v, lo=0.0, hi=1.0)
            if v not in names.label_noise or v == 0:
                raise SpecError(path, f"{v:g} is not a noise level > 0 of this study's pretrain.sweep.label_noise")
            return v
        if ref == "head_weight_decay":
            v = number(path, v, lo=0.0)
            if v not in names.head_weight_decay:
                raise SpecError(path, f"{v:g} is not a value of this study's pretrain.sweep.head_weight_decay")
            return v
        if ref == "shots":
            if v not in names.shots:
                listed = ", ".join(str(s) for s in names.shots)
                raise SpecError(path, f"{short(v)} is not a shots setting of this study (transfer.shots: {listed})")
            return v
        v = string(path, v)
        if v not in getattr(names, ref):
            raise SpecError(path, f"{short(v)} is not a {ref} of this study")
        return v

    return read


def read_claims(path: str, data: Any, names: StudyNames) -> tuple[ClaimSpec, ...]:
    """The ``claims:`` list, each claim checked against :data:`CLAIM_KINDS` and the study's names."""
    if not isinstance(data, list):
        raise SpecError(path, f"must be a list of claims ({{kind: ..., ...}}), got {typename(data)}")
    out, seen = [], set()
    for i, item in enumerate(data):
        at = f"{path}[{i}]"
        kind = item.get("kind") if isinstance(item, dict) else None
        if isinstance(item, dict) and kind is None:
            raise SpecError(f"{at}.kind", f"is required; one of: {', '.join(CLAIM_KINDS)}")
        if isinstance(item, dict):
            kind = choice(tuple(CLAIM_KINDS))(f"{at}.kind", kind)
        params = CLAIM_KINDS[kind][1] if kind else {}
        m = Mapping(at, item, ("kind", "name", *params))
        values = {}
        for key, p in params.items():
            if p.required:
                values[key] = m.get(key, _reader(p.ref, names))
            else:
                values[key] = m.get(key, _reader(p.ref, names), p.default)
        name = m.get("name", string, None) or f"{kind} #{i}"
        if name in seen:
            raise SpecError(f"{at}.name", f"duplicate claim name {short(name)}")
        seen.add(name)
        if kind == "source_advantage" and values["source"] == values["other"]:
            raise SpecError(f"{at}.other", "must differ from source")
        if kind == "best_layer_differs" and values["near"] == values["far"]:
            raise SpecError(f"{at}.far", "must differ from near")
        if kind == "head_decay_disagreement" and values["low"] >= values["high"]:
            raise SpecError(f"{at}.high", "must be above low")
        if kind == "best_layer_differs" and values["layer"] == values["final"]:
            raise SpecError(f"{at}.layer", "must differ from final")
        out.append(ClaimSpec(kind, name, tuple(_arm_expect(kind, values).items())))
    return tuple(out)
