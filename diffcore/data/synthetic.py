"""The ``synthetic`` dataset: labelled shapes drawn on the fly, and a classifier that reads them back.

Each item is one saturated shape (its class fixes colour and form; size, position, brightness and a
small hue jitter vary) on a dark background. Items are a pure function of (seed, index), so the
quickstart needs no download and two runs see the same data. :func:`classify` measures the class of
any image from its pixels, which gives generated samples an automatic quality figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffcore.data.synthetic_config import CATALOGUE, SyntheticConfig
from diffcore.errors import UserError

_BY_NAME = {name: (hue, shape) for name, hue, shape in CATALOGUE}
_SUPERSAMPLE = 4  # sub-pixels per side for anti-aliased edges
#: fraction of its bounding box each form fills (measured on drawn shapes); classify checks it
FILL = {"circle": 0.79, "square": 0.99, "triangle": 0.55, "cross": 0.55, "ring": 0.55, "diamond": 0.55}


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a form of radius ``r`` at offsets (dx, dy) from its centre (y points down)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base 0.7 r below the centre
        height = (dy + r) / 1.7
        return (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= height)
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(shape)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h / 60.0) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def draw(name: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``name``: (3, res, res) float32 in [0, 1]."""
    hue, shape = _BY_NAME[name]
    r = resolution * rng.uniform(0.2, 0.34)
    margin = r + 1
    cx, cy = rng.uniform(margin, resolution - margin, size=2)
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    dy, dx = coords[:, None] - cy, coords[None, :] - cx
    cover = _shape_mask(shape, dx, dy, r).astype(np.float32)
    cover = cover.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))
    colour = _hsv_to_rgb((hue + rng.uniform(-8, 8)) % 360, rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.0))
    background = np.full(3, rng.uniform(0.02, 0.15))
    image = background[:, None, None] * (1 - cover) + colour[:, None, None] * cover
    return image.astype(np.float32)


class SyntheticShapes:
    """Map-style dataset of ``{"pixels", "labels", "captions"}``; ``class_names`` names the labels."""

    def __init__(self, config: SyntheticConfig, where: str = "$.data"):
        self.class_names = config.class_names()
        unknown = [c for c in self.class_names if c not in _BY_NAME]
        if unknown:
            raise UserError(
                f"unknown synthetic class {unknown[0]!r}",
                where=f"{where}.classes",
                hint="choose from " + ", ".join(_BY_NAME),
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise UserError("a synthetic class is listed twice", where=f"{where}.classes")
        if config.resolution < 8:
            raise UserError(
                f"resolution {config.resolution} is too small",
                where=f"{where}.resolution",
                hint="use 8 or more",
            )
        if config.size < 1:
            raise UserError("size must be at least 1", where=f"{where}.size")
        self.config = config

    def __len__(self) -> int:
        return self.config.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        label = index % len(self.class_names)  # balanced classes
        rng = np.random.default_rng([self.config.seed, index])
        image = draw(self.class_names[label], self.config.resolution, rng)
        return {
            "pixels": torch.from_numpy(image * 2 - 1),
            "labels": label,
            "captions": "a " + self.class_names[label],
        }


def classify(
    pixels: torch.Tensor | np.ndarray, class_names: list[str] | None = None, *, check_form: bool = False
) -> torch.Tensor:
    """The class of each image measured from its pixels ((B, 3, H, W) or (3, H, W) in [-1, 1]).

    The hue of the saturated foreground picks the class, which counts only when the image looks like
    a drawn item: a dark background, a foreground of one coherent colour covering a few percent of the
    image and little else. ``check_form`` also asks for the class's form (a bounding box about as wide
    as tall that the shape fills as that form does), a stricter figure that small, briefly trained
    models reach much later than colour. Returns (B,) long indices into ``class_names`` (default: the
    dataset's default classes); -1 where no class is seen.
    """
    if class_names is None:  # the dataset's default classes; pass the dataset's class_names otherwise
        class_names = SyntheticConfig().class_names()
    images = torch.as_tensor(pixels).detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    hues = torch.tensor([_BY_NAME[c][0] for c in class_names])
    out = torch.full((images.shape[0],), -1, dtype=torch.long)
    for i, image in enumerate(((images + 1) / 2).clamp(0, 1)):
        out[i] = _classify_one(image, class_names, hues, check_form)
    return out


def _classify_one(rgb: torch.Tensor, class_names: list[str], hues: torch.Tensor, check_form: bool) -> int:
    value = rgb.max(0).values
    chroma = value - rgb.min(0).values
    saturation = chroma / value.clamp_min(1e-6)
    fg = (value > 0.5) & (saturation > 0.5)
    bg = value < 0.3
    n = value.numel()
    if fg.sum() < 0.03 * n or bg.sum() < 0.4 * n or (fg | bg).sum() < 0.85 * n:
        return -1
    r, g, b = rgb[0][fg], rgb[1][fg], rgb[2][fg]
    c = chroma[fg]
    # hue in degrees per pixel, then a circular mean (red wraps around 0)
    h = (
        torch.where(
            value[fg] == r, ((g - b) / c) % 6, torch.where(value[fg] == g, (b - r) / c + 2, (r - g) / c + 4)
        )
        * 60
    )
    rad = torch.deg2rad(h)
    mean = torch.rad2deg(torch.atan2(rad.sin().mean(), rad.cos().mean())) % 360
    distance = (hues - mean + 180) % 360 - 180
    label = int(distance.abs().argmin())
    spread = ((h - hues[label] + 180) % 360 - 180).abs()
    if distance[label].abs() > 25 or (spread <= 30).float().mean() < 0.8:
        return -1
    if check_form:
        rows = fg.any(1).nonzero()
        cols = fg.any(0).nonzero()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        fill = float(fg.sum()) / (height * width)
        # every form is about as wide as tall (the triangle 2r by 1.7r)
        if not 0.7 <= width / height <= 1.45 or abs(fill - FILL[_BY_NAME[class_names[label]][1]]) > 0.15:
            return -1
    return label


def build_synthetic(config: SyntheticConfig, where: str = "$.data") -> SyntheticShapes:
    return SyntheticShapes(config, where=where)
