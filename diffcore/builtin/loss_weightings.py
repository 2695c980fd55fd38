"""Built-in loss weightings: configs and records (no torch at import; the weightings live in
:mod:`diffcore.diffusion.weighting`). A job selects one with ``train.loss_weighting: {type: ...}``;
without it the scheduler's own ``loss_weight`` applies."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.records import LossWeightingSpec


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")


@attrs.define(kw_only=True)
class NoWeightingConfig:
    """Every sample weighs 1."""


@attrs.define(kw_only=True)
class MinSNRConfig:
    #: the SNR above which samples stop gaining weight (the paper uses 5)
    gamma: float = attrs.field(default=5.0, validator=_positive)


@attrs.define(kw_only=True)
class FlowTimeConfig:
    """SD3's weightings of the flow time s (sigma_sqrt: 1 / s^2; cosmap: 2 / (pi (1 - 2s + 2s^2)))."""


@attrs.define(kw_only=True)
class EDMConfig:
    #: the standard deviation of the training data (latents or pixels) EDM's weighting assumes
    sigma_data: float = attrs.field(default=0.5, validator=_positive)


def _none(config: NoWeightingConfig):
    from diffcore.diffusion.weighting import NoWeighting

    return NoWeighting()


def _min_snr(config: MinSNRConfig):
    from diffcore.diffusion.weighting import MinSNRWeighting

    return MinSNRWeighting(config.gamma)


def _flow_time(scheme: str):
    def build(config: FlowTimeConfig):
        from diffcore.diffusion.weighting import FlowTimeWeighting

        return FlowTimeWeighting(scheme)

    return build


def _edm(config: EDMConfig):
    from diffcore.diffusion.weighting import EDMWeighting

    return EDMWeighting(config.sigma_data)


def records() -> list[LossWeightingSpec]:
    return [
        LossWeightingSpec(name="none", config=NoWeightingConfig, factory=_none, description="every sample weighs 1"),
        LossWeightingSpec(
            name="min_snr", config=MinSNRConfig, factory=_min_snr,
            description="min-SNR-gamma (Hang et al. 2023) in the units of the model's target",
        ),
        LossWeightingSpec(
            name="sigma_sqrt", config=FlowTimeConfig, factory=_flow_time("sigma_sqrt"),
            description="SD3's 1 / sigma^2 of the flow time",
        ),
        LossWeightingSpec(
            name="cosmap", config=FlowTimeConfig, factory=_flow_time("cosmap"),
            description="SD3's cosmap of the flow time",
        ),
        LossWeightingSpec(
            name="edm", config=EDMConfig, factory=_edm,
            description="EDM's (s^2 + sd^2) / (s sd)^2 on the x0 error, s = sigma / alpha",
        ),
    ]
