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


def check_mix(sections: list[Any], where: str = WHERE) -> list[tuple[str, Any, float, int]]:
    """Each entry of a mix as (type, structured config, weight, repeats); problems carry paths."""
    from diffcore.api import component_config
    from diffcore.errors import ConfigError, Problem

    if not sections:
        raise ConfigError([Problem(f"{where}.datasets", "a mix needs at least one dataset")])
    out, problems = [], []
    for i, section in enumerate(sections):
        path = f"{where}.datasets[{i}]"
        if not isinstance(section, dict) or "type" not in section:
            problems.append(Problem(path, "each entry needs a type: (folder, metadata, ...)"))
            continue
        options = dict(section)
        kind = str(options.pop("type"))
        weight, rep = options.pop("weight", 1.0), options.pop("repeats", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            problems.append(Problem(f"{path}.weight", f"expected a number >= 0, got {weight!r}"))
        if isinstance(rep, bool) or not isinstance(rep, int) or rep < 0:
            problems.append(Problem(f"{path}.repeats", f"expected a whole number >= 0, got {rep!r}"))
        try:
            inner = component_config("dataset", kind, options, where=path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except UserError as exc:  # an unknown type: the message lists what is installed
            problems.append(Problem(exc.where or path, exc.message))
            continue
        out.append((kind, inner, float(weight), rep))
    if problems:
        raise ConfigError(problems)
    return out


def build_mix(config: MixConfig, where: str = WHERE) -> Any:
    from diffcore.data.mix import MixDataset
    from diffcore.registry import get_registry

    datasets, weights, repeats = [], [], []
    for i, (kind, inner, weight, rep) in enumerate(check_mix(config.datasets, where)):
        path = f"{where}.datasets[{i}]"
        builder = {"folder": build_folder, "metadata": build_metadata, "mix": build_mix}.get(kind)
        if builder is not None and isinstance(inner, (FolderConfig, MetadataConfig, MixConfig)):
            ds = builder(inner, path)
        else:
            ds = get_registry().get("dataset", kind, where=f"{path}.type").spec.factory(inner)
        datasets.append(ds)
        weights.append(weight)
        repeats.append(rep)
    return MixDataset(datasets, weights, repeats, seed=config.seed, cache_dir=config.cache_dir)
