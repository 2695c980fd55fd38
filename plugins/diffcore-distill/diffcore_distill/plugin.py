"""Entry point of diffcore-distill: registers the ``lcm``, ``consistency`` and ``reflow`` methods
(no torch at import)."""

from __future__ import annotations

import diffcore
from diffcore_distill.config import ConsistencyConfig, ReflowConfig


def _lcm(config: ConsistencyConfig):
    from diffcore_distill.consistency import ConsistencyDistillation

    return ConsistencyDistillation(config, "lcm")


def _consistency(config: ConsistencyConfig):
    from diffcore_distill.consistency import ConsistencyDistillation

    return ConsistencyDistillation(config, "consistency")


def _reflow(config: ReflowConfig):
    from diffcore_distill.reflow import ReflowMethod

    return ReflowMethod(config)


@diffcore.hookimpl
def diffcore_register_methods():
    return [
        diffcore.MethodSpec(
            name="lcm",
            config=ConsistencyConfig,
            factory=_lcm,
            description="latent consistency distillation (LCM, LCM-LoRA) of eps/v models; sample with the lcm sampler in 2-8 steps",
        ),
        diffcore.MethodSpec(
            name="consistency",
            config=ConsistencyConfig,
            factory=_consistency,
            description="consistency distillation of rectified-flow models (DiT, Flux); sample with the lcm sampler in 1-4 steps",
        ),
        diffcore.MethodSpec(
            name="reflow",
            config=ReflowConfig,
            factory=_reflow,
            description="rectified-flow reflow: teacher (noise, sample) pairs in a resumable shard cache, then straight couplings; 1-4 Euler steps",
        ),
    ]
