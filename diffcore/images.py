"""Writing generated images: one PNG per sample and a grid."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def image_grid(pixels: torch.Tensor, columns: int | None = None, pad: int = 2):
    """A Pillow image tiling the batch, ``columns`` wide (square-ish by default)."""
    from PIL import Image

    images = to_uint8(pixels)
    n, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    array = grid.numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


def save_images(
    pixels: torch.Tensor, folder: str | Path, prefix: str = "sample", grid_name: str | None = "grid.png"
) -> list[Path]:
    """Save each image as ``<prefix>-<i>.png`` in ``folder`` and, unless ``grid_name`` is None, a grid."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(pixels).numpy()):
        path = folder / f"{prefix}-{i:03d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
    if grid_name:
        image_grid(pixels).save(folder / grid_name)
    return paths
