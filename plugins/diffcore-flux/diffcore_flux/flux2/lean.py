"""Autograd functions that keep less for backward than their plain-PyTorch compositions.

Flux.2's blocks spend most activation memory around the norms and the SwiGLU MLPs. Composed from
torch ops, ``silu(gate) * value`` keeps ``silu(gate)`` besides the linear output it came from, and
``layer_norm(x) * (1 + scale) + shift`` keeps the normalised ``x`` besides ``x``; both are cheap to
recompute in backward from what is kept anyway. Values and gradients are the compositions' own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, value = x.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * value * (sig * (1 + gate * (1 - sig)))
        return torch.cat((d_gate, grad * silu), dim=-1)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` keeping only ``x`` for backward."""
    return _SwiGLU.apply(x)


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        # the native kernel hands back its statistics, which backward reuses
        normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        ctx.save_for_backward(x, mean, rstd, scale)
        return torch.addcmul(shift[:, None], normed, 1 + scale[:, None])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, mean, rstd, scale = ctx.saved_tensors
        normed = ((x - mean) * rstd).to(grad.dtype)
        d_shift = grad.sum(1)
        d_scale = (grad * normed).sum(1)
        d_normed = grad * (1 + scale[:, None])
        d_x = torch.ops.aten.native_layer_norm_backward(
            d_normed, x, [x.shape[-1]], mean, rstd, None, None, [True, False, False]
        )[0]
        return d_x, d_shift, d_scale, None


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` (no affine; (B, C) shift/scale over (B, L, C)) keeping
    ``x``, its statistics and ``scale`` for backward rather than the normalised ``x``."""
    return _NormModulate.apply(x, shift, scale, eps)
