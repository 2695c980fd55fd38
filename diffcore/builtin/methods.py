"""Built-in training methods (records only; no torch at import)."""

from __future__ import annotations

from diffcore.methods.config import DiffusionMethodConfig
from diffcore.records import MethodSpec


def _diffusion(config: DiffusionMethodConfig):
    from diffcore.methods.diffusion import DiffusionMethod

    return DiffusionMethod(config)


def records() -> list:
    return [
        MethodSpec(
            name="diffusion",
            config=DiffusionMethodConfig,
            factory=_diffusion,
            description="denoising objective of the model's prediction type (full finetune, or the adapter)",
        )
    ]
