"""Adaptive-norm modulation shared by DiT, MMDiT and Flux blocks."""

from __future__ import annotations

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with (B, C) shift/scale broadcast over the sequence of (B, L, C)."""
    if shift.ndim == 2 and x.ndim == 3:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift
