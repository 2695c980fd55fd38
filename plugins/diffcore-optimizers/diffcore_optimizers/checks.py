"""What each optimizer cannot run with, found before a run loads its model (``OptimizerSpec.validate``).
Torch-free: a library is looked for, not imported."""

from __future__ import annotations

from typing import Any

from diffcore import Problem
from diffcore_optimizers.packages import WHERE, missing


def adamw8bit(job: Any) -> list[Problem]:
    return missing("bitsandbytes", optimizer="adamw8bit", install="diffcore-optimizers[8bit]")


def prodigy(job: Any) -> list[Problem]:
    return missing("prodigyopt", optimizer="prodigy", install="prodigyopt")


def lion(job: Any) -> list[Problem]:
    return missing("lion_pytorch", optimizer="lion", install="lion-pytorch")


def schedulefree_adamw(job: Any) -> list[Problem]:
    problems = missing("schedulefree", optimizer="schedulefree_adamw", install="schedulefree")
    train = job.train
    if train.deepspeed.zero_stage != 0 or train.mixed_precision != "no":
        # the loop checks the engine too; this says it before the model loads
        problems.append(Problem(
            WHERE,
            "schedulefree_adamw moves the weights between its training and evaluation points in place, which "
            f"DeepSpeed's master copy of them would not follow (zero_stage {train.deepspeed.zero_stage}, "
            f"mixed_precision {train.mixed_precision}): use train.deepspeed.zero_stage: 0 and "
            "train.mixed_precision: no, or another optimizer",
        ))  # fmt: skip
    return problems
