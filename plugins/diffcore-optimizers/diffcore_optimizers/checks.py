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
    stage, precision = train.deepspeed.zero_stage, train.mixed_precision
    # it moves the weights it steps in place: the module's own (ZeRO 0 in fp32) or DeepSpeed's fp32
    # partition under ZeRO 1-2, copied back into the module; stage 0's mixed-precision wrapper and
    # ZeRO-3 offer no such copy (the loop checks the engine too; this says it before the model loads)
    if stage == 3 or (stage == 0 and precision != "no"):
        problems.append(Problem(
            WHERE,
            "schedulefree_adamw moves the weights between its training and evaluation points in place, which "
            f"DeepSpeed's master copy of them would not follow at zero_stage {stage} with mixed_precision "
            f"{precision}: use train.deepspeed.zero_stage 1 or 2 (one GPU too), or zero_stage 0 with "
            "mixed_precision: no",
        ))  # fmt: skip
    return problems
