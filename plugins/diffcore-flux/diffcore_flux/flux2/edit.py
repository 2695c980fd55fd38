"""Flux.2's image inputs besides the noisy latent: Kontext references and the two Fill forms.

Token ids are (t, h, w, l): the target image t = 0, reference ``i`` t = 10 * (i + 1) (diffusers'
``_prepare_image_ids``), text (0, 0, 0, position). Latents are flattened row-major (the autoencoder
already patchified 2x2, so the transformer's patch is 1).

Fill, reference form (klein; diffusers' Flux2KleinInpaintPipeline): the source image is the first
reference; the mask, binarised and resized bilinearly to the latent grid, keeps the unmasked area on
the source's own noising path. The pipeline does that by re-noising the source after every step; here
the same path is expressed as a velocity, ``(x - source) / sigma``, blended with the model's by the
mask, so every sampler (and training) follows it. Fill, channel-concatenation form (Flux.1 Fill's):
the masked source's latents and the mask folded to the latent grid are appended to the input channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: time-axis id step between references (diffusers' ``scale``)
REFERENCE_STEP = 10


def flatten(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return latents.flatten(2).transpose(1, 2)


def unflatten(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, (height, width))


def grid_ids(height: int, width: int, t: float = 0.0, *, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, 4) ids (t, row, col, 0) of a latent of ``height`` x ``width``."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    t_col = torch.full((grid.shape[0], 1), float(t), device=device)
    return torch.cat((t_col, grid, torch.zeros_like(t_col)), dim=-1)


def reference_ids(shapes: Sequence[tuple[int, int]], *, device: torch.device | None = None) -> torch.Tensor:
    """Ids of references of latent sizes ``shapes``, in order, at t = 10, 20, ..."""
    parts = [grid_ids(h, w, REFERENCE_STEP * (i + 1), device=device) for i, (h, w) in enumerate(shapes)]
    return torch.cat(parts, dim=0)


def text_ids(length: int, *, device: torch.device | None = None) -> torch.Tensor:
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device, dtype=torch.float32)
    return ids


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] (1 = repaint) binarised at 0.5 and resized bilinearly to the
    latent grid, as Flux2KleinInpaintPipeline prepares it."""
    binary = (mask.float() >= 0.5).float()
    return F.interpolate(binary, size=(height, width), mode="bilinear")


def fold_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, factor**2, H/factor, W/factor) for the channel-concatenation form: the
    autoencoder's 8x8 cells first (Flux.1 Fill's order), then the 2x2 patch in (c, pi, pj) order as the
    Flux.2 autoencoder patchifies its channels."""
    b, _, h, w = mask.shape
    inner, patch = factor // 2, 2
    hh, ww = h // factor, w // factor
    # pixel (row, col) = ((hh*2 + pi)*inner + i, (ww*2 + pj)*inner + j)
    x = mask.float().reshape(b, hh, patch, inner, ww, patch, inner)
    x = x.permute(0, 3, 6, 2, 5, 1, 4)  # (b, i, j, pi, pj, hh, ww)
    return x.reshape(b, factor * factor, hh, ww)


def fill_velocity(
    model_v: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, source: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The model's velocity inside the mask, the source's noising path outside it."""
    s = sigma.reshape(-1, 1, 1, 1).to(noisy.dtype).clamp_min(1e-6)
    keep = (noisy - source.to(noisy.dtype)) / s
    m = mask.to(model_v.dtype)
    return m * model_v + (1 - m) * keep.to(model_v.dtype)
