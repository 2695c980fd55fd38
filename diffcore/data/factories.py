"""Factories of the built-in datasets (import torch and Pillow only when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcore.data.config import FolderConfig, MetadataConfig, MixConfig
from diffcore.errors import UserError

WHERE = "$.data"


def build_folder(config: FolderConfig, where: str = WHERE) -> Any:
    from diffcore.data.dataset import ImageDataset
    from diffcore.data.sources import list_folder

    listing = list_folder(
        Path(config.path).expanduser(),
        labels=config.labels,
        caption_ext=config.caption_ext,
        default_caption=config.default_caption,
        where=where,
    )
    return ImageDataset(listing, config, where=where)


def build_metadata(config: MetadataConfig, where: str = WHERE) -> Any:
    from diffcore.data.dataset import ImageDataset
    from diffcore.data.sources import list_metadata

    columns = {
        "image": config.image_column,
        "caption": config.caption_column,
        "label": config.label_column,
        "mask": config.mask_column,
        "control": config.control_column,
        "reference": config.reference_column,
    }
    listing = list_metadata(
        Path(config.file).expanduser(),
        root=Path(config.root).expanduser() if config.root else None,
        columns=columns,
        default_caption=config.default_caption,
        where=where,
    )
    return ImageDataset(listing, config, where=where)


def build_mix(config: MixConfig, where: str = WHERE) -> Any:
    from diffcore.api import component_config
    from diffcore.data.mix import MixDataset
    from diffcore.registry import get_registry

    if not config.datasets:
        raise UserError("a mix needs at least one dataset", where=f"{where}.datasets")
    datasets, weights, repeats = [], [], []
    for i, section in enumerate(config.datasets):
        path = f"{where}.datasets[{i}]"
        if not isinstance(section, dict) or "type" not in section:
            raise UserError("each entry needs a type: (folder, metadata, ...)", where=path)
        options = dict(section)
        kind = str(options.pop("type"))
        weight, rep = options.pop("weight", 1.0), options.pop("repeats", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"weight must be a number >= 0, got {weight!r}", where=f"{path}.weight")
        if isinstance(rep, bool) or not isinstance(rep, int) or rep < 0:
            raise UserError(f"repeats must be a whole number >= 0, got {rep!r}", where=f"{path}.repeats")
        inner = component_config("dataset", kind, options, where=path)
        builder = {"folder": build_folder, "metadata": build_metadata, "mix": build_mix}.get(kind)
        if builder is not None and isinstance(inner, (FolderConfig, MetadataConfig, MixConfig)):
            ds = builder(inner, path)
        else:
            ds = get_registry().get("dataset", kind, where=f"{path}.type").spec.factory(inner)
        datasets.append(ds)
        weights.append(float(weight))
        repeats.append(rep)
    return MixDataset(datasets, weights, repeats, seed=config.seed, cache_dir=config.cache_dir)
