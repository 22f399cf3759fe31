"""The study spec: YAML in, a typed and validated :class:`StudySpec` out.

Every problem is reported as a :class:`SpecError` whose message starts with the dotted path of
the offending field (``pretrain.sweep.label_noise[1]: must be in [0, 1], got 1.5``). Only a
:class:`yaml.SafeLoader` reads the file, so YAML tags cannot construct objects.

A minimal study::

    study: quickstart
    sources:   {mnist: {uri: "builtin:mnist"}}
    tasks:     {digits: {uri: "builtin:digits"}}
    pretrain:
      method: supervised
      model: small-cnn
      image_size: 32
      epochs: 2
      sweep: {source: [mnist], pretrain_size: [500, 2000], label_noise: [0.0, 0.4], seed: [0]}
    transfer:
      protocol: [linear_probe]
      shots: [1, 5, 10, full]
      seeds: [0, 1, 2]
    resources: {workers: 1, cpus_per_worker: 1, use_gpu: false}
    tracking_uri: null

The package: :mod:`~orchestrator.spec.schema` declares the dataclasses (each field with its
default and the reader of its YAML value), :mod:`~orchestrator.spec.fields` holds the readers,
:mod:`~orchestrator.spec.parse` reads a document section by section, :mod:`~orchestrator.spec.load`
reads study files.
"""

from orchestrator.spec.fields import SpecError, short
from orchestrator.spec.load import QUICK_SUFFIX, apply_overrides, apply_quick, load_spec, resolved_document
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.schema import (
    AMP_MODES,
    COUNTERFACTUAL_ARMS,
    DEFAULT_STORAGE,
    INFLUENCE_OUTPUTS,
    LIGHT_TRIAL_GPUS,
    LR_SCHEDULES,
    MAX_DATAMODELS,
    NOISE_PATTERNS,
    PACK_MODES,
    SEARCH_ALGORITHMS,
    Budget,
    CounterfactualSpec,
    DatamodelSpec,
    DataRef,
    FinetuneSearch,
    FinetuneSpec,
    PretrainSettings,
    PretrainSpec,
    Resources,
    StudySpec,
    TransferSpec,
)
from trainers.protocols import FULL, METHODS, PROTOCOLS

__all__ = [
    "AMP_MODES",
    "COUNTERFACTUAL_ARMS",
    "DEFAULT_STORAGE",
    "FULL",
    "INFLUENCE_OUTPUTS",
    "LIGHT_TRIAL_GPUS",
    "LR_SCHEDULES",
    "PACK_MODES",
    "MAX_DATAMODELS",
    "METHODS",
    "NOISE_PATTERNS",
    "PROTOCOLS",
    "QUICK_SUFFIX",
    "SEARCH_ALGORITHMS",
    "Budget",
    "CounterfactualSpec",
    "DataRef",
    "DatamodelSpec",
    "FinetuneSearch",
    "FinetuneSpec",
    "PretrainSettings",
    "PretrainSpec",
    "Resources",
    "SpecError",
    "StudySpec",
    "TransferSpec",
    "apply_overrides",
    "apply_quick",
    "load_spec",
    "resolved_document",
    "parse_spec",
    "short",
]
