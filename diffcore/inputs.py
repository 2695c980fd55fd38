"""Extra inference inputs (control, reference images, masks) read from files for sampling.

``diffcore sample --input control=PATH`` and the sample callback's ``inputs`` use the same code, so
training-time samples see what final inference sees: the image resized to the sample size (no crop),
in [-1, 1], BCHW, repeated for every image of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def load_edit_inputs(
    references: Sequence[str | Path],
    mask: str | Path | None,
    *,
    count: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    where: str = "--reference",
) -> dict[str, Any]:
    """Reference images (Kontext editing) and an inpainting mask as a batch's ``reference`` (one
    (count, 3, H, W) tensor, or a list of them for several) and ``mask`` ((count, 1, H, W) in [0, 1]),
    read at the sample size like :func:`load_inputs`. A reference of another aspect than the sample
    (it would be stretched), or a mask of another size than the first reference (the image it
    edits), is a UserError."""
    out: dict[str, Any] = {}
    named = {f"reference {i + 1}": Path(p) for i, p in enumerate(references)}
    sizes = {}
    for label, path in [*named.items(), *([("mask", Path(mask))] if mask is not None else [])]:
        try:
            image = load(path, "L" if label == "mask" else "RGB")
        except BadImage as exc:
            raise UserError(f"cannot read the {label} image {path}: {exc}", where=where) from None
        sizes[label] = (image.height, image.width)
        if label != "mask" and abs(image.width * height - image.height * width) > max(height, width):
            raise UserError(
                f"{label} is {image.width}x{image.height} pixels: it would be stretched to the "
                f"{width}x{height} sample",
                where=f"{where} {path}",
                hint="crop it to the sample's aspect ratio, or set the sample size to its own",
            )
    if mask is not None and named and sizes["mask"] != sizes["reference 1"]:
        (mh, mw), (rh, rw) = sizes["mask"], sizes["reference 1"]
        raise UserError(
            f"the mask is {mw}x{mh} pixels but the image it edits (the first reference) is {rw}x{rh}",
            where=f"--mask {mask}" if where.startswith("--") else f"{where}.mask",
            hint="give a mask of the image's size",
        )
    files: dict[str, str | Path] = {str(i): p for i, p in enumerate(references)}
    if mask is not None:
        files["mask"] = mask
    loaded = load_inputs(files, count=count, height=height, width=width, device=device, where=where)
    refs = [loaded[str(i)] for i in range(len(references))]
    if refs:
        out["reference"] = refs[0] if len(refs) == 1 else refs
    if mask is not None:
        out["mask"] = loaded["mask"]
    return out
