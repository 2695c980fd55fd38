"""The default method: noise a clean latent, predict, regress onto the scheduler's target.

All randomness of a step (condition dropout, noise, offset noise, timesteps) is drawn for the whole
*global* batch from a generator seeded by (seed, micro-step) and sliced for this rank: a run on N
ranks computes exactly what one rank computes with an N-times batch, and a resumed run draws what
the uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from diffcore.builtin.methods import DiffusionMethodConfig


class DiffusionMethod:
    def __init__(self, config: DiffusionMethodConfig):
        self.config = config

    def setup(self, ctx: Any) -> list[torch.nn.Parameter]:
        if ctx.adapter_params is not None:
            return list(ctx.adapter_params)
        ctx.model.backbone.requires_grad_(True)
        return [p for p in ctx.model.backbone.parameters() if p.requires_grad]

    def loss(self, ctx: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model, sched = ctx.model, ctx.scheduler
        device = ctx.device
        rand = ctx.step_random
        if "latents" in batch:
            latents = batch["latents"].to(device=device, dtype=torch.float32)
        else:
            latents = model.encode_images(batch["pixels"].to(device)).float()
        b = latents.shape[0]

        if self.config.condition_dropout > 0 and "cond" not in batch:
            drop = rand.rand(b) < self.config.condition_dropout
            batch = _drop_conditions(model, batch, drop)
        if "cond" in batch:
            cond = _to_device(batch["cond"], device)
        else:
            cond = model.encode_conditions(batch)

        noise = rand.randn(tuple(latents.shape)).to(device)
        offset = float(getattr(sched, "noise_offset", 0.0) or 0.0)
        if offset:
            noise = noise + offset * rand.randn((b, latents.shape[1]) + (1,) * (latents.ndim - 2)).to(device)
        seq_len = model.sequence_length(latents) if hasattr(model, "sequence_length") else None
        t = rand.call(lambda n, g: sched.sample_t(n, g, torch.device("cpu"), seq_len=seq_len), b).to(device)
        noisy = sched.add_noise(latents, noise, t)
        extra = {}
        if getattr(model, "guidance_embedded", False):
            extra["guidance"] = torch.full((b,), float(getattr(model, "train_guidance", 1.0)), device=device)
        pred = model.predict(noisy, t, cond, **extra).float()
        target = sched.target(latents, noise, t, model.prediction_type).float()

        if self.config.loss == "mse":
            err = (pred - target) ** 2
        elif self.config.loss == "l1":
            err = (pred - target).abs()
        else:
            err = F.huber_loss(pred, target, reduction="none", delta=self.config.huber_delta)
        if "mask" in batch:
            mask = batch["mask"].to(device=device, dtype=err.dtype)
            mask = F.interpolate(mask, size=err.shape[-2:], mode="area") if mask.shape[-2:] != err.shape[-2:] else mask
            per_sample = (err * mask).flatten(1).sum(1) / (mask.expand_as(err).flatten(1).sum(1)).clamp_min(1e-6)
        else:
            per_sample = err.flatten(1).mean(1)
        weight = sched.loss_weight(t, model.prediction_type).to(per_sample)
        loss = (weight * per_sample).mean()
        return loss, {}


def _drop_conditions(model: Any, batch: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
    if not bool(drop.any()):
        return batch
    null = model.null_batch(batch) if hasattr(model, "null_batch") else batch
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


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
