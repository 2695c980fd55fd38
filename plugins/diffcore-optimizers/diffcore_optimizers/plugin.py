"""Entry point: registers the optimizers. Imports no torch (discovery stays cheap); each library is
imported when its optimizer is built."""

from __future__ import annotations

import diffcore
from diffcore_optimizers import checks, factories
from diffcore_optimizers.config import (
    AdafactorConfig,
    AdamW8bitConfig,
    LionConfig,
    ProdigyConfig,
    ScheduleFreeAdamWConfig,
)


@diffcore.hookimpl
def diffcore_register_optimizers():
    return [
        diffcore.OptimizerSpec(
            name="adamw8bit", config=AdamW8bitConfig, factory=factories.adamw8bit, validate=checks.adamw8bit,
            description="AdamW with 8-bit moments (bitsandbytes; pip install diffcore-optimizers[8bit])",
        ),
        diffcore.OptimizerSpec(
            name="adafactor", config=AdafactorConfig, factory=factories.adafactor,
            description="Adafactor, factored second moments (torch)",
        ),
        diffcore.OptimizerSpec(
            name="prodigy", config=ProdigyConfig, factory=factories.prodigy, validate=checks.prodigy,
            description="Prodigy, Adam that learns its step size (prodigyopt; train.lr 1.0)",
        ),
        diffcore.OptimizerSpec(
            name="schedulefree_adamw", config=ScheduleFreeAdamWConfig, factory=factories.schedulefree_adamw,
            set_mode=factories.schedulefree_mode, validate=checks.schedulefree_adamw,
            description="schedule-free AdamW (schedulefree; constant lr; not ZeRO-3)",
        ),
        diffcore.OptimizerSpec(
            name="lion", config=LionConfig, factory=factories.lion, validate=checks.lion,
            description="Lion, sign updates (lion-pytorch)",
        ),
    ]  # fmt: skip
