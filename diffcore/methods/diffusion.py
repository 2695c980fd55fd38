"""The default method: noise a clean latent, predict, regress onto the scheduler's target.

Methods that change only what predicts (a ControlNet feeding residuals, a student head) subclass
:class:`DiffusionMethod` and override ``predict`` (used in training and at inference alike) and
``modules``; DreamBooth-style methods call :meth:`DiffusionMethod.denoising_loss` per part of a batch.
All randomness is drawn through ``ctx.step_random`` (see :class:`diffcore.context.StepRandom`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from diffcore.context import TrainContext
from diffcore.method import Logs, Method
from diffcore.methods.config import DiffusionMethodConfig


@attrs.frozen
class Noised:
    """One micro-batch made ready to predict: clean latents, the noise, times and conditioning."""

    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    noisy: torch.Tensor
    cond: Any
    #: keyword arguments ``predict`` takes besides (noisy, t, cond): the training guidance of
    #: distilled-guidance models
    extra: dict[str, Any]


class DiffusionMethod(Method):
    def __init__(self, config: DiffusionMethodConfig):
        self.config = config

    def setup(self, ctx: TrainContext) -> Iterable[torch.nn.Parameter]:
        """The adapter's parameters when one is attached, else the whole backbone (full finetune),
        unless the method's own modules are what trains."""
        if ctx.adapter_params is not None:
            return list(ctx.adapter_params)
        if ctx.method_modules:
            return []
        ctx.model.backbone.requires_grad_(True)
        return [p for p in ctx.model.backbone.parameters() if p.requires_grad]

    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        return self.denoising_loss(ctx, batch), {}

    # -- the parts, for subclasses ----------------------------------------------------------------
    def denoising_loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> torch.Tensor:
        """The weighted regression loss of one batch (a scalar)."""
        noised = self.noise(ctx, batch)
        pred = self.predict(ctx.model, noised.noisy, noised.t, noised.cond, batch, **noised.extra).float()
        target = ctx.scheduler.target(noised.latents, noised.noise, noised.t, ctx.model.prediction_type).float()
        return self.regression(ctx, pred, target, noised.t, batch).mean()

    def noise(self, ctx: TrainContext, batch: Mapping[str, Any]) -> Noised:
        """Latents, conditioning (with dropout), noise and times of one micro-batch."""
        model, sched, device = ctx.model, ctx.scheduler, ctx.device
        rand = ctx.step_random
        assert rand is not None, "the loop sets ctx.step_random before every micro-step"
        latents = self.clean_latents(ctx, batch)
        b = latents.shape[0]

        if self.config.condition_dropout > 0 and "cond" not in batch:
            drop = rand.rand(b) < self.config.condition_dropout
            batch = drop_conditions(model, batch, drop)
        cond = self.conditions(ctx, batch)

        noise = rand.randn(tuple(latents.shape)).to(device)
        if sched.noise_offset:
            shape = (b, latents.shape[1]) + (1,) * (latents.ndim - 2)
            noise = noise + sched.noise_offset * rand.randn(shape).to(device)
        seq_len = model.sequence_length(latents)
        t = rand.call(lambda n, g: sched.sample_t(n, g, torch.device("cpu"), seq_len=seq_len), b).to(device)
        extra: dict[str, Any] = {}
        if model.guidance_embedded:
            extra["guidance"] = torch.full((b,), float(model.train_guidance), device=device)
        return Noised(latents, noise, t, sched.add_noise(latents, noise, t), cond, extra)

    @staticmethod
    def clean_latents(ctx: TrainContext, batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's clean latents in float32: cached ones as they are, else its pixels encoded."""
        if "latents" in batch:
            return batch["latents"].to(device=ctx.device, dtype=torch.float32)
        return ctx.model.encode_images(batch["pixels"].to(ctx.device)).float()

    @staticmethod
    def conditions(ctx: TrainContext, batch: Mapping[str, Any]) -> Any:
        """The batch's conditioning: cached text completed by what its images give, else encoded."""
        if "cond" in batch:
            return ctx.model.complete_conditions(to_device(batch["cond"], ctx.device), batch)
        return ctx.model.encode_conditions(batch)

    def regression(
        self, ctx: TrainContext, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """Per-sample weighted error (shape (b,)), masked where the batch has a ``mask``."""
        if self.config.loss == "mse":
            err = (pred - target) ** 2
        elif self.config.loss == "l1":
            err = (pred - target).abs()
        else:
            err = F.huber_loss(pred, target, reduction="none", delta=self.config.huber_delta)
        if "mask" in batch:
            mask = batch["mask"].to(device=err.device, dtype=err.dtype)
            if mask.shape[-2:] != err.shape[-2:]:
                mask = F.interpolate(mask, size=err.shape[-2:], mode="area")
            per_sample = (err * mask).flatten(1).sum(1) / mask.expand_as(err).flatten(1).sum(1).clamp_min(1e-6)
        else:
            per_sample = err.flatten(1).mean(1)
        prediction_type = ctx.model.prediction_type
        if ctx.loss_weighting is not None:
            weight = ctx.loss_weighting.weight(t, ctx.scheduler, prediction_type)
        else:
            weight = ctx.scheduler.loss_weight(t, prediction_type)
        return weight.to(per_sample) * per_sample


def drop_conditions(model: Any, batch: Mapping[str, Any], drop: torch.Tensor) -> dict[str, Any]:
    """``batch`` with the conditioning of the rows where ``drop`` is true replaced by the model's
    null conditioning (``model.null_batch``)."""
    null = model.null_batch(batch)
    out = dict(batch)
    for key in ("captions", "labels"):
        if key not in batch or key not in null:
            continue
        if isinstance(batch[key], torch.Tensor):
            keep = ~drop.to(batch[key].device)
            shape = (-1,) + (1,) * (batch[key].ndim - 1)
            out[key] = torch.where(keep.view(shape), batch[key], torch.as_tensor(null[key]).to(batch[key]))
        else:
            out[key] = [n if d else v for v, n, d in zip(batch[key], null[key], drop.tolist())]
    return out


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
