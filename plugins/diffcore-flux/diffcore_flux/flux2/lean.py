"""Autograd functions that keep less for backward than their plain-PyTorch compositions.

Flux.2's blocks spend most activation memory around the norms and the SwiGLU MLPs. Composed from
torch ops, ``silu(gate) * value`` keeps ``silu(gate)`` besides the linear output it came from, and
``layer_norm(x) * (1 + scale) + shift`` keeps the normalised ``x`` besides ``x``; both are cheap to
recompute in backward from what is kept anyway. RoPE rotates channel pairs with one complex multiply
instead of stacking two real halves. Values and gradients are the compositions' own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, value: torch.Tensor, d_gate: torch.Tensor, d_value: torch.Tensor
) -> None:
    # writes the gradients into d_gate and d_value (halves of one buffer)
    if torch.compiler.is_compiling():  # dynamo refuses non-contiguous out=; the compiler fuses the copies
        d_value.copy_(grad * F.silu(gate))
        d_gate.copy_(torch.ops.aten.silu_backward(grad * value, gate))
        return
    torch.mul(grad, F.silu(gate), out=d_value)
    torch.ops.aten.silu_backward.grad_input(grad * value, gate, grad_input=d_gate)


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
        out = torch.empty_like(x)  # both halves written in place: no concatenation
        d_gate, d_value = out.chunk(2, dim=-1)
        _swiglu_backward(grad, gate, value, d_gate, d_value)
        return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` keeping only ``x`` for backward."""
    return _SwiGLU.apply(x)


def _heads(y: torch.Tensor, heads: int, width: int) -> tuple[torch.Tensor, ...]:
    # the first ``width`` channels of (B, L, C) as (3, B, H, L, D) views
    return y[..., :width].unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


class _SplitHeads(torch.autograd.Function):
    # Autograd's own split of a fused projection's output sends the q, k, v gradients through a
    # stack, a copy back to the (B, L, 3, H, D) layout and, in a single block, a concatenation with
    # the MLP half's gradient: three copies of the widest gradient of the block. This backward
    # writes each into its place of one buffer, and the SwiGLU half in place beside them. ``rows``
    # keeps the queries and the SwiGLU of those tokens only (their gradient elsewhere is zero).
    @staticmethod
    def forward(
        ctx: Any, y: torch.Tensor, heads: int, mlp_hidden: int, rows: slice | None
    ) -> tuple[torch.Tensor, ...]:
        width = y.shape[-1] - 2 * mlp_hidden
        ctx.heads, ctx.width, ctx.mlp_hidden, ctx.rows = heads, width, mlp_hidden, rows
        q, k, v = _heads(y, heads, width)
        if rows is not None:
            q = q[:, :, rows]
        if not mlp_hidden:
            ctx.shape = y.shape
            return q, k, v
        ctx.save_for_backward(y)
        gate, value = y[:, rows or slice(None), width:].chunk(2, dim=-1)
        return q, k, v, F.silu(gate) * value

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if ctx.mlp_hidden:
            (y,) = ctx.saved_tensors
            shape = y.shape
        else:
            shape = ctx.shape
        rows = ctx.rows or slice(None)
        out = grads[0].new_empty(shape)
        places = _heads(out, ctx.heads, ctx.width)
        places[0][:, :, rows].copy_(grads[0])
        places[1].copy_(grads[1])
        places[2].copy_(grads[2])
        if ctx.rows is not None:  # the rows left out got no gradient
            start, stop, _ = rows.indices(shape[1])
            for skipped in (slice(None, start), slice(stop, None)):
                places[0][:, :, skipped].zero_()
                out[:, skipped, ctx.width :].zero_()
        if ctx.mlp_hidden:
            grad = grads[3]
            gate, value = y[:, rows, ctx.width :].chunk(2, dim=-1)
            d_gate, d_value = out[:, rows, ctx.width :].chunk(2, dim=-1)
            _swiglu_backward(grad, gate, value, d_gate, d_value)
        return out, None, None, None


def split_heads(y: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused (B, L, 3 * H * D) projection as q, k, v (B, H, L, D) views; backward assembles their
    gradients in one buffer."""
    q, k, v = _SplitHeads.apply(y, heads, 0, None)
    return q, k, v


def split_heads_swiglu(
    y: torch.Tensor, heads: int, mlp_hidden: int, rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A single block's fused (B, L, 3 * H * D + 2 * mlp_hidden) ``linear1`` output as q, k, v
    (B, H, L, D) views and the SwiGLU of the rest (gate half first), keeping only ``y`` for backward,
    which writes every gradient into one buffer. With ``rows`` (a slice of L, step 1), the queries
    and the SwiGLU of those tokens only."""
    q, k, v, act = _SplitHeads.apply(y, heads, mlp_hidden, rows)
    return q, k, v, act


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


def rope_cis(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffcore.nn.rope_frequencies' (cos, sin) tables as one complex table."""
    return torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of (B, H, L, D) ``x`` by the complex table (L, D/2): the
    values of diffcore.nn.apply_rope in one complex multiply (no stacking of the two halves)."""
    if cis.ndim == x.ndim - 1:  # a table per batch row (B, L, D/2): add the head axis
        cis = cis.unsqueeze(-3)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    # float32 (B, H, L, D) by a complex table already shaped to broadcast
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * cis).flatten(-2)


class _RmsRope(torch.autograd.Function):
    # Composed, the per-head RMS norm and the rotation keep the input, the normalised input and the
    # weighted one, and run about twice the passes over (B, H, L, D) in backward; this keeps the
    # input (a view of the projection, alive anyway) and the inverse RMS.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, cis: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_wide(x.dtype))
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = ms.add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight, cis)
        return _rotate((xf * rstd).mul_(weight), cis).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        x, rstd, weight, cis = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        d_y = _rotate(grad.to(rstd.dtype).contiguous(), cis.conj())  # the inverse rotation
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (d_y * normed).sum(dim=tuple(range(x.ndim - 1))).to(weight.dtype)
        d_y.mul_(weight)
        # d_x = rstd * (d_y - normed * mean(d_y * normed))
        dot = (d_y * normed).sum(-1, keepdim=True).div_(-x.shape[-1])
        return torch.addcmul(d_y, normed, dot).mul_(rstd).to(x.dtype), d_weight, None, None


def rms_rope(x: torch.Tensor, weight: torch.Tensor, cis: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``apply_rope(rms_norm(x, weight), cis)`` for (B, H, L, D) queries or keys (statistics in
    float32), keeping only ``x`` and its inverse RMS for backward."""
    if cis.ndim == x.ndim - 1:  # a table per batch row (B, L, D/2): add the head axis
        cis = cis.unsqueeze(-3)
    return _RmsRope.apply(x, weight.to(x.dtype), cis, eps)
