"""The keys of ``train.optimizer`` for each optimizer (validated as ``$.train.optimizer.*``). Torch-free.

Defaults are the libraries' own, except where a comment says why.
"""

from __future__ import annotations

import math
from typing import Any

import attrs


def _betas(instance: Any, attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
    if not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"{attribute.name} must each be in [0, 1), got {list(value)}")


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _not_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.define(kw_only=True)
class AdamW8bitConfig:
    """bitsandbytes' AdamW with block-wise 8-bit moments (``adamw8bit``)."""

    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    eps: float = attrs.field(default=1e-8, validator=_positive)
    weight_decay: float = attrs.field(default=0.01, validator=_not_negative)
    #: tensors with fewer elements keep 32-bit moments (quantising small ones saves nothing)
    min_8bit_size: int = attrs.field(default=4096, validator=_not_negative)


@attrs.define(kw_only=True)
class AdafactorConfig:
    """torch's Adafactor (``adafactor``): factored second moments, no first moment. ``train.lr`` is
    relative to each tensor's RMS (about 1e-2)."""

    #: the second-moment decay at step t is 1 - t ** beta2_decay
    beta2_decay: float = attrs.field(default=-0.8)
    #: added to the squared gradient; None: the smallest normal number of the dtype
    eps1: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: the least parameter RMS the relative step is scaled by
    eps2: float = attrs.field(default=1e-3, validator=_not_negative)
    #: clipping threshold of the update's RMS
    d: float = attrs.field(default=1.0, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_not_negative)

    @beta2_decay.validator
    def _decay(self, attribute: attrs.Attribute, value: float) -> None:
        if value > 0:
            raise ValueError(f"beta2_decay must be at most 0, got {value}")


@attrs.define(kw_only=True)
class ProdigyConfig:
    """Prodigy (``prodigy``, prodigyopt): Adam that estimates its own step size D. Set ``train.lr``
    to 1.0: it scales D (the schedule still applies)."""

    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    #: the decay of D's estimate; None: sqrt(beta2)
    beta3: float | None = attrs.field(default=None)
    eps: float = attrs.field(default=1e-8, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_not_negative)
    #: AdamW-style decoupled weight decay
    decouple: bool = True
    use_bias_correction: bool = False
    safeguard_warmup: bool = False
    #: the initial estimate of D
    d0: float = attrs.field(default=1e-6, validator=_positive)
    d_coef: float = attrs.field(default=1.0, validator=_positive)
    #: the most D may grow per step (a factor); inf: unbounded
    growth_rate: float = attrs.field(default=math.inf, validator=_at_least_one)
    #: estimate D from every slice_p-th element (saves memory on large tensors)
    slice_p: int = attrs.field(default=1, validator=_at_least_one)
    #: the optimizer state is split across processes (ZeRO 1-3 with several GPUs): D's sums are
    #: all-reduced so every shard steps with the same D (prodigyopt's fsdp_in_use; CUDA only).
    #: Without it each process estimates D from its own shard
    sharded: bool = False

    @beta3.validator
    def _beta3(self, attribute: attrs.Attribute, value: float | None) -> None:
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"beta3 must be in [0, 1), got {value}")


@attrs.define(kw_only=True)
class ScheduleFreeAdamWConfig:
    """Schedule-free AdamW (``schedulefree_adamw``, schedulefree). It needs no learning-rate
    schedule: keep ``train.lr_schedule: constant`` and warm up with ``warmup_steps`` here."""

    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    eps: float = attrs.field(default=1e-8, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_not_negative)
    #: the optimizer's own linear warm-up
    warmup_steps: int = attrs.field(default=0, validator=_not_negative)
    #: polynomial weighting of the average (power r)
    r: float = attrs.field(default=0.0, validator=_not_negative)
    #: weights of the average during warm-up: lr ** weight_lr_power
    weight_lr_power: float = attrs.field(default=2.0, validator=_not_negative)

    @betas.validator
    def _interpolation(self, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
        # the evaluation point is found by dividing by beta1
        if value[0] <= 0:
            raise ValueError(f"betas[0] must be above 0 for schedule-free AdamW, got {value[0]}")


@attrs.define(kw_only=True)
class LionConfig:
    """Lion (``lion``, lion-pytorch): sign updates, one moment. Use an lr 3-10x below AdamW's and a
    weight decay 3-10x above."""

    betas: tuple[float, float] = attrs.field(default=(0.9, 0.99), validator=_betas)
    weight_decay: float = attrs.field(default=0.0, validator=_not_negative)
    #: weight decay independent of the learning rate
    decoupled_weight_decay: bool = False
