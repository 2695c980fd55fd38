"""Sinusoidal timestep embeddings and the MLP that usually follows them."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) times, shape (N, dim).

    Frequencies are ``max_period ** (-i / (half - downscale_freq_shift))``; the output is
    ``[sin, cos]`` or ``[cos, sin]`` with ``flip_sin_to_cos`` (the conventions of DDPM, DiT, SD and
    Flux differ only in these knobs). Computed in float32 whatever the input dtype.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :] * scale
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """``linear_1 -> SiLU -> linear_2``: the projection every architecture puts after the sinusoid."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
