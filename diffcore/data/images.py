"""Reading images with Pillow: cheap checks at start, decoding and geometry at load time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


class BadImage(Exception):
    """An image that cannot be used; the message says why in a few words."""


def probe(path: Path, *, decode: bool = False) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied); raises :class:`BadImage`.

    Opens and verifies the file (a structural check that catches truncated PNGs and non-images
    without decoding pixels); ``decode`` also decodes it, which catches truncated JPEGs.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
            if decode:
                img.load()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt or truncated ({exc})") from None
    if orientation in _TRANSPOSED:
        width, height = height, width
    if width < 1 or height < 1:
        raise BadImage("empty image")
    return height, width


def load(path: Path, mode: str) -> Image.Image:
    """The decoded image in ``mode`` ("RGB" or "L"), EXIF orientation applied; raises :class:`BadImage`."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
                # Transparent pixels go on white, as most captioned sets expect.
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
                canvas.alpha_composite(img)
                img = canvas
            return img.convert(mode)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt or truncated ({exc})") from None


def fit(
    img: Image.Image, resized: tuple[int, int], top: int, left: int, size: tuple[int, int], flip: bool
) -> np.ndarray:
    """Resize to ``resized`` (h, w), crop ``size`` (h, w) at (top, left), flip; uint8 HWC (or HW) array."""
    if img.size != (resized[1], resized[0]):
        shrinking = resized[1] < img.size[0]
        method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        if img.mode == "L":
            method = Image.Resampling.BILINEAR  # masks: no ringing past 0 and 1
        img = img.resize((resized[1], resized[0]), method, reducing_gap=3.0 if shrinking else None)
    img = img.crop((left, top, left + size[1], top + size[0]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(img)  # a writable copy: torch.from_numpy wants one
