"""Rotary position embeddings over n position axes (Flux.1 uses 3, Flux.2 uses 4).

Each token carries one integer-or-fractional position per axis; axis ``i`` rotates ``axes_dim[i]``
channels of every head, and the per-axis tables are concatenated along the channel dimension.
Channel pairs are interleaved (``(x0, x1), (x2, x3), ...``) as in BFL's reference code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_frequencies(
    ids: torch.Tensor, axes_dim: Sequence[int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables of shape (..., L, sum(axes_dim) // 2) for positions ``ids`` (..., L, n_axes)."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} position axes, axes_dim names {len(axes_dim)}")
    # float64 keeps large positions exact; mps has no float64, so it falls back to float32 there.
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"rope axis {axis} has odd size {dim}")
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim)
        angles.append(ids[..., axis].to(wide)[..., None] * omega)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) queries or keys by tables from :func:`rope_frequencies`.

    Tables of shape (L, D/2) apply to every batch row; (B, L, D/2) per row.
    """
    if cos.ndim == x.ndim - 1:  # (B, L, D/2): add the head axis
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
