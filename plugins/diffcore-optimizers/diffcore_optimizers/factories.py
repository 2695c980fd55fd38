"""``factory(params, config, lr)`` for each optimizer: the library's class with the config's keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffcore_optimizers.config import (
    AdafactorConfig,
    AdamW8bitConfig,
    LionConfig,
    ProdigyConfig,
    ScheduleFreeAdamWConfig,
)
from diffcore_optimizers.packages import require


def adamw8bit(params: Iterable[Any], config: AdamW8bitConfig, lr: float) -> Any:
    bnb = require("bitsandbytes", optimizer="adamw8bit", install="diffcore-optimizers[8bit]")
    return bnb.optim.AdamW8bit(
        params, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
        min_8bit_size=config.min_8bit_size,
    )  # fmt: skip


def adafactor(params: Iterable[Any], config: AdafactorConfig, lr: float) -> Any:
    import torch

    return torch.optim.Adafactor(
        params, lr=lr, beta2_decay=config.beta2_decay, eps=(config.eps1, config.eps2), d=config.d,
        weight_decay=config.weight_decay,
    )  # fmt: skip


def prodigy(params: Iterable[Any], config: ProdigyConfig, lr: float) -> Any:
    prodigyopt = require("prodigyopt", optimizer="prodigy", install="prodigyopt")
    return prodigyopt.Prodigy(
        params, lr=lr, betas=tuple(config.betas), beta3=config.beta3, eps=config.eps,
        weight_decay=config.weight_decay, decouple=config.decouple, use_bias_correction=config.use_bias_correction,
        safeguard_warmup=config.safeguard_warmup, d0=config.d0, d_coef=config.d_coef,
        growth_rate=config.growth_rate, slice_p=config.slice_p, fsdp_in_use=config.sharded,
    )  # fmt: skip


def schedulefree_adamw(params: Iterable[Any], config: ScheduleFreeAdamWConfig, lr: float) -> Any:
    schedulefree = require("schedulefree", optimizer="schedulefree_adamw", install="schedulefree")
    return schedulefree.AdamWScheduleFree(
        params, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, r=config.r, weight_lr_power=config.weight_lr_power,
    )  # fmt: skip


def schedulefree_mode(optimizer: Any, training: bool) -> None:
    """Move the weights to schedule-free's training point y (``training``) or its evaluation point x,
    the average it reports (``OptimizerSpec.set_mode``)."""
    if training:
        optimizer.train()
    else:
        optimizer.eval()


def lion(params: Iterable[Any], config: LionConfig, lr: float) -> Any:
    lion_pytorch = require("lion_pytorch", optimizer="lion", install="lion-pytorch")
    return lion_pytorch.Lion(
        params, lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
        decoupled_weight_decay=config.decoupled_weight_decay,
    )  # fmt: skip
