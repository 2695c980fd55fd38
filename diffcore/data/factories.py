"""Factories of the built-in datasets (import torch and Pillow only when called)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffcore.data.config import FolderConfig, MetadataConfig, MixConfig, parse_mix
from diffcore.errors import UserError

WHERE = "$.data"


def build_folder(config: FolderConfig, build: Build | None = None, where: str = WHERE) -> Any:
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


def build_metadata(config: MetadataConfig, build: Build | None = None, where: str = WHERE) -> Any:
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


#: what a composite dataset's factory gets to build a nested section: ``build({type: ..., **options},
#: where) -> Dataset``, structured against the registry with problems reported at ``where``
Build = Callable[[Mapping[str, Any], str], Any]


def build_mix(config: MixConfig, build: Build, where: str = WHERE) -> Any:
    from diffcore.data.mix import MixDataset
    from diffcore.errors import ConfigError, Problem

    datasets, weights, repeats, problems = [], [], [], []
    for i, (section, weight, rep) in enumerate(parse_mix(config.datasets, where)):
        path = f"{where}.datasets[{i}]"
        try:
            datasets.append(build(section, path))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except UserError as exc:  # an unknown type: the message lists what is installed
            problems.append(Problem(exc.where or path, exc.message))
            continue
        weights.append(weight)
        repeats.append(rep)
    if problems:
        raise ConfigError(problems)
    return MixDataset(datasets, weights, repeats, seed=config.seed, cache_dir=config.cache_dir)
