"""Multi-head attention through ``scaled_dot_product_attention`` (flash/mem-efficient on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over (B, H, L, D) tensors, returned merged as (B, L, H*D).

    ``mask`` is boolean (True = attend) or additive, broadcastable to (B, H, Lq, Lk).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return merge_heads(out)
