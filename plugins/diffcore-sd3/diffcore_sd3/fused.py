"""Autograd functions that keep less for backward than the composed ops they replace.

Both take plain tensors (a norm gain at most), so LoRA layers and ZeRO-3's parameter gathering,
which work through module forwards, are unaffected. They exist for memory: in an MMDiT block the
normed-then-modulated inputs and the q/k norms account for a large share of what autograd keeps.
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    # statistics in float32 at least (bfloat16/float16 inputs), float64 kept
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _ModulatedLayerNorm(torch.autograd.Function):
    """``layer_norm(x) * (1 + scale_i) + shift_i`` for one or more (shift, scale) pairs, keeping x, its
    statistics and the scales; the normed tensor is recomputed in backward instead of kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, *mods: torch.Tensor):
        normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        factors = [1 + scale[:, None] for scale in mods[1::2]]
        ctx.save_for_backward(x, mean, rstd, *factors)
        return tuple(torch.addcmul(shift[:, None], normed, f) for shift, f in zip(mods[0::2], factors, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, mean, rstd, *factors = ctx.saved_tensors
        normed = ((_wide(x) - mean) * rstd).to(grads[0].dtype)
        out: list[torch.Tensor | None] = [None, None]
        total = None
        for grad, factor in zip(grads, factors, strict=True):
            out += [grad.sum(1), (grad * normed).sum(1)]
            total = grad * factor if total is None else total.addcmul_(grad, factor)
        grad_x = torch.ops.aten.native_layer_norm_backward(
            total, x, (x.shape[-1],), mean, rstd, None, None, [True, False, False]
        )[0]
        out[0] = grad_x
        return tuple(out)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-affine layer norm of (B, L, D) ``x`` over D, then ``* (1 + scale) + shift`` with (B, D)
    shift and scale."""
    return _ModulatedLayerNorm.apply(x, eps, shift, scale)[0]


def modulated_layer_norms(
    x: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer norm of ``x`` under two (shift, scale) modulations (MMDiT-X's two attentions)."""
    return _ModulatedLayerNorm.apply(x, eps, *first, *second)


class _RMSNorm(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps) * weight`` keeping the unit-RMS tensor and the inverse RMS: not
    the input, which for q and k is a view that would keep the whole fused qkv output alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _wide(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        unit = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(unit, rstd, weight)
        return unit * weight.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, rstd, weight = ctx.saved_tensors
        gw = _wide(grad * weight.to(grad.dtype))
        u = _wide(unit)
        grad_x = (rstd * (gw - u * (gw * u).mean(-1, keepdim=True))).to(grad.dtype)
        grad_w = (grad * unit).reshape(-1, unit.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm over the last dimension with a learned gain, statistics in float32."""
    return _RMSNorm.apply(x, weight, eps)
