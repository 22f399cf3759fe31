"""The words the trainers understand, shared with the spec, the plan and the analysis: the
pretraining methods, the transfer protocols, ``full``, the final layer and the step-loss key of
a pretraining report.

It imports nothing (no torch), so the spec validates and the analysis reads runs without
loading a model library.
"""

FULL = "full"  # shots: the whole training pool; pretrain_size: the whole source
FINAL_LAYER = "final"  # the backbone's output, what every probe reads unless transfer.layers says otherwise

METHODS = ("supervised", "clip", "simclr")
PROTOCOLS = ("linear_probe", "logistic", "finetune", "lp_ft", "zero_shot")
FROZEN_PROTOCOLS = ("linear_probe", "logistic")  # probes on frozen features of a layer (datamodels use these)
FINETUNE_PROTOCOLS = ("finetune", "lp_ft")  # train the whole network on the shots

# In a pretraining loop's epoch report: [[global optimizer step, batch loss], ...], one pair every
# ``log_every_steps`` steps of the epoch; a curve finer than the epoch, sent with the epoch's
# report because each report is a checkpoint barrier.
STEP_LOSSES = "train_loss_steps"
