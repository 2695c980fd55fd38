"""2x2 latent packing and the position ids the RoPE reads.

A (B, C, H, W) latent becomes (B, H/2 * W/2, 4C) tokens, channels ordered (c, row-in-patch,
col-in-patch) as BFL and diffusers do. Image token ids are (index, row, col): index 0 for the image
being denoised, 1 for a Kontext reference; text ids are all zero.
"""

from __future__ import annotations

import torch

from diffcore.errors import UserError


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UserError(
            f"Flux latents must have even height and width, got {h}x{w}",
            where="latents",
            hint="use image sizes that are multiples of 16 pixels",
        )
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, index: int = 0, *, device: torch.device | None = None) -> torch.Tensor:
    """(H/2 * W/2, 3) ids of a packed latent of ``height`` x ``width``: (index, row, col)."""
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    first = torch.full((grid.shape[0], 1), float(index), device=device)
    return torch.cat((first, grid), dim=-1)


def text_ids(length: int, *, device: torch.device | None = None) -> torch.Tensor:
    return torch.zeros(length, 3, device=device)


def sequence_length(latents: torch.Tensor) -> int:
    """Image tokens of a (B, C, H, W) latent: what Flux's resolution-dependent shift reads."""
    return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
