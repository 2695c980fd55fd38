"""Built-in schedulers (records only; no torch at import)."""

from __future__ import annotations

from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.records import SchedulerSpec


def _build(config: DDPMConfig | FlowConfig):
    from diffcore.diffusion.scheduler import make_scheduler

    return make_scheduler(config)


def records() -> list:
    return [
        SchedulerSpec(
            name="ddpm",
            config=DDPMConfig,
            factory=_build,
            description="DDPM-family noise schedule (linear, scaled_linear, cosine; eps/v/x0 targets)",
        ),
        SchedulerSpec(
            name="flow",
            config=FlowConfig,
            factory=_build,
            description="Rectified flow with fixed or resolution-dependent (Flux) shift",
        ),
    ]
