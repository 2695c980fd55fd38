"""Extra inference inputs (control, reference images) read from files for sampling.

``diffcore sample --input control=PATH`` and the sample callback's ``inputs`` use the same code, so
training-time samples see what final inference sees: the image resized to the sample size (no crop),
in [-1, 1], BCHW, repeated for every image of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from diffcore.data.dataset import to_tensor
from diffcore.data.images import BadImage, fit, load
from diffcore.errors import UserError


def load_inputs(
    paths: Mapping[str, str | Path],
    *,
    count: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    where: str = "--input",
) -> dict[str, torch.Tensor]:
    """Each ``key: image file`` as a (count, C, height, width) tensor in [-1, 1]; masks ("mask" keys)
    are read as one channel in [0, 1]."""
    out = {}
    for key, path in paths.items():
        mode = "L" if key == "mask" else "RGB"
        try:
            image = load(Path(path), mode)
        except BadImage as exc:
            raise UserError(f"cannot read the {key} image {path}: {exc}", where=f"{where} {key}") from None
        pixels = to_tensor(fit(image, (height, width), 0, 0, (height, width), False))
        out[key] = pixels.unsqueeze(0).expand(count, *pixels.shape).contiguous().to(device)
    return out
