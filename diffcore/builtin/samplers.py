"""Built-in samplers: configs and records (no torch at import; the samplers live in
:mod:`diffcore.diffusion.samplers`).

Every built-in sampler takes the x0 options of :class:`X0Options`, applied to the denoised estimate
before each step. Pixel-space eps models need them: an eps error at high noise becomes a large x0
overshoot that the next steps cannot undo.
"""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.records import SamplerSpec


def _positive_or_none(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be positive, got {value}")


def _percentile(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"must be a fraction in (0, 1], e.g. 0.995, got {value}")


def _not_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")


@attrs.define(kw_only=True)
class X0Options:
    """What happens to the denoised estimate x0 before every step."""

    #: clamp x0 to [-clip_x0, clip_x0] (1.0 for a pixel-space model on images in [-1, 1])
    clip_x0: float | None = attrs.field(default=None, validator=_positive_or_none)
    #: dynamic thresholding (Imagen): per sample, s = this percentile of |x0|, at least 1 and at most
    #: ``threshold_max``; x0 is clamped to [-s, s] and divided by s
    dynamic_threshold: float | None = attrs.field(default=None, validator=_percentile)
    #: the largest s dynamic thresholding may take (None: no cap)
    threshold_max: float | None = attrs.field(default=None, validator=_positive_or_none)


def _fraction(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a fraction of the steps in [0, 1], got {value}")


@attrs.define(kw_only=True)
class SkipLayerOptions(X0Options):
    """Skip-layer guidance (SD3.5's recommended setting: ``skip_layers: [7, 8, 9]``): on the steps i
    with ``start * steps < i < stop * steps``, with classifier-free guidance on, the guided output
    gains ``scale * (cond - cond_skipped)``, where cond_skipped is the conditional prediction with
    those backbone blocks passed over (models declaring ``layer_skipping``). Every built-in
    sampler's config has these beside the x0 options."""

    #: block indices to pass over; empty: no skip-layer guidance
    skip_layers: list[int] = attrs.Factory(list)
    skip_layer_scale: float = 2.8
    skip_layer_start: float = attrs.field(default=0.01, validator=_fraction)
    skip_layer_stop: float = attrs.field(default=0.2, validator=_fraction)


@attrs.define(kw_only=True)
class PlainSamplerConfig(SkipLayerOptions):
    """A sampler with no options of its own (ddpm, euler, euler_a, heun, lcm)."""


@attrs.define(kw_only=True)
class DDIMConfig(SkipLayerOptions):
    #: stochasticity: 0 deterministic DDIM, 1 the DDPM posterior noise
    eta: float = attrs.field(default=0.0, validator=_not_negative)


@attrs.define(kw_only=True)
class DPMPP2MConfig(SkipLayerOptions):
    #: space DDPM-family noise levels per Karras et al. (rectified flow has its own spacing)
    karras: bool = False


@attrs.define(kw_only=True)
class DPMPP2MKarrasConfig(DPMPP2MConfig):
    karras: bool = True


def _factory(method: str):
    def build(config: X0Options):
        from diffcore.diffusion.samplers import BuiltinSampler

        eta = config.eta if isinstance(config, DDIMConfig) else 0.0
        karras = config.karras if isinstance(config, DPMPP2MConfig) else False
        return BuiltinSampler(method, config, eta=eta, karras=karras)

    build.__name__ = f"build_{method}"
    return build


_BUILTIN: tuple[tuple[str, str, type, str], ...] = (
    ("ddpm", "ddpm", PlainSamplerConfig, "DDPM ancestral sampling (posterior draws)"),
    ("ddim", "ddim", DDIMConfig, "DDIM, deterministic unless eta > 0"),
    ("euler", "euler", PlainSamplerConfig, "Euler in the schedule's native levels (flow Euler on rectified flow)"),
    ("flow_euler", "euler", PlainSamplerConfig, "alias of euler"),
    ("euler_a", "euler_a", PlainSamplerConfig, "Euler ancestral (k-diffusion)"),
    ("euler_ancestral", "euler_a", PlainSamplerConfig, "alias of euler_a"),
    ("heun", "heun", PlainSamplerConfig, "Heun's second-order method (two model calls per step)"),
    ("dpmpp_2m", "dpmpp_2m", DPMPP2MConfig, "DPM-Solver++(2M)"),
    ("dpm++_2m", "dpmpp_2m", DPMPP2MConfig, "alias of dpmpp_2m"),
    ("dpmpp_2m_karras", "dpmpp_2m", DPMPP2MKarrasConfig, "DPM-Solver++(2M) with Karras noise levels"),
    ("lcm", "lcm", PlainSamplerConfig, "LCM multistep consistency sampling (distilled few-step models, 1-8 steps)"),
)


def records() -> list[SamplerSpec]:
    return [
        SamplerSpec(name=name, config=config, factory=_factory(method), description=description)
        for name, method, config, description in _BUILTIN
    ]
