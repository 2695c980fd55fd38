"""Built-in training methods (records only; no torch at import)."""

from __future__ import annotations

from typing import Literal

import attrs

from diffcore.records import MethodSpec


@attrs.define(kw_only=True)
class DiffusionMethodConfig:
    """The default method: train the model's ``prediction_type`` objective with the job's scheduler."""

    #: share of examples whose conditioning is dropped (captions emptied, null class), for guidance
    condition_dropout: float = 0.0
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = 1.0


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
