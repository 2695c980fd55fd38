"""Running an image-to-image network tile by tile, blending the overlaps.

Each tile is processed on its own, so memory stays that of one tile. Tiles overlap by ``overlap``
input pixels; in the overlap the outputs are averaged with weights that ramp linearly from one tile to
the next, which hides the seams. The network's GroupNorms see one tile's statistics instead of the
whole image's, so a tiled result differs slightly from an untiled one everywhere (not only at seams).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch


def starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size`` with full tiles; the last one is flush with the end."""
    if size <= tile:
        return [0]
    step = max(tile - overlap, 1)
    return list(range(0, size - tile, step)) + [size - tile]


def _ramp(length: int, ramp: int, before: bool, after: bool, device: torch.device) -> torch.Tensor:
    w = torch.ones(length, device=device)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, device=device, dtype=torch.float32) / (ramp + 1)
        if before:
            w[:ramp] = up
        if after:
            w[length - ramp :] = up.flip(0)
    return w


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: Fraction
) -> torch.Tensor:
    """``fn(x)`` computed over ``tile``-sized windows of ``x`` (B, C, H, W) overlapping by ``overlap``.

    ``scale`` is output pixels per input pixel (8 for a decoder, 1/8 for an encoder); tile origins and
    sizes must map to whole output pixels.
    """
    _, _, height, width = x.shape
    rows, cols = starts(height, tile, overlap), starts(width, tile, overlap)
    ramp = int(overlap * scale)
    out = weight = None
    for top in rows:
        for left in cols:
            y = fn(x[:, :, top : top + tile, left : left + tile])
            if out is None:
                out_shape = (y.shape[0], y.shape[1], int(height * scale), int(width * scale))
                out = torch.zeros(out_shape, device=y.device, dtype=torch.float32)
                weight = torch.zeros(out_shape[2:], device=y.device, dtype=torch.float32)
                dtype = y.dtype
            th, tw = y.shape[-2:]
            oy, ox = int(top * scale), int(left * scale)
            wy = _ramp(th, ramp, top > 0, top + tile < height, y.device)
            wx = _ramp(tw, ramp, left > 0, left + tile < width, y.device)
            w = wy[:, None] * wx[None, :]
            out[:, :, oy : oy + th, ox : ox + tw].addcmul_(y.float(), w)
            weight[oy : oy + th, ox : ox + tw] += w
            del y
    assert out is not None and weight is not None
    return out.div_(weight).to(dtype)
