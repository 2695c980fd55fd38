"""Built-in optimizers (records only; no torch at import)."""

from __future__ import annotations

import attrs

from diffcore.records import OptimizerSpec


@attrs.define(kw_only=True)
class AdamWConfig:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    #: torch's fused kernel (one launch for the whole update); None: fused on CUDA, else foreach
    fused: bool | None = None
    #: torch's foreach kernels (one op per group of tensors); None: see fused
    foreach: bool | None = None


@attrs.define(kw_only=True)
class SGDConfig:
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


def _adamw(params, config: AdamWConfig, lr: float):
    import torch

    from diffcore.training.fast_paths import adamw_kernels

    params = list(params)
    kernels = adamw_kernels(params, config.fused, config.foreach)
    return torch.optim.AdamW(
        params, lr=lr, betas=(config.betas[0], config.betas[1]), eps=config.eps, weight_decay=config.weight_decay,
        fused=kernels["fused"], foreach=kernels["foreach"],
    )  # fmt: skip


def _sgd(params, config: SGDConfig, lr: float):
    import torch

    return torch.optim.SGD(
        params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )


def records() -> list:
    return [
        OptimizerSpec(name="adamw", config=AdamWConfig, factory=_adamw, description="torch AdamW"),
        OptimizerSpec(name="sgd", config=SGDConfig, factory=_sgd, description="torch SGD (with momentum)"),
    ]
