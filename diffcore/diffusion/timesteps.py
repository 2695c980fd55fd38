"""Training-time sampling of u in (0, 1); schedulers map u to their own time (shifted sigma or
discrete timestep)."""

from __future__ import annotations

import math

import torch


def sample_u(
    n: int,
    generator: torch.Generator | None,
    method: str,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """n draws (float32, on the generator's device) of u in (0, 1).

    uniform; logit_normal: sigmoid(N(mean, std)); mode: SD3's density with heavier middle
    (scale 1.29 in the paper); cosmap: 1 - 1 / (tan(pi u / 2) + 1) (SD3 paper, eq. 21).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    if method == "logit_normal":
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(z * logit_std + logit_mean)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    if method == "uniform":
        return u
    if method == "mode":
        return mode_u(u, mode_scale)
    if method == "cosmap":
        return cosmap_u(u)
    raise ValueError(f"unknown timestep sampling {method!r}")


def mode_u(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3's mode sampling: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def cosmap_u(u: torch.Tensor) -> torch.Tensor:
    """SD3's CosMap: t = 1 - 1 / (tan(pi u / 2) + 1)."""
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
