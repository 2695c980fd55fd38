"""Cheap data checks that need no images read and no torch: what `diffcore validate` can say about a
job's data before a run spends its start-up on it (bucket feasibility, paths that do not exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcore.data.buckets import NoBucket, bucket_setup
from diffcore.data.config import FolderConfig, ImageOptions, MetadataConfig, MixConfig, parse_mix
from diffcore.errors import ConfigError, Problem, UserError


def data_problems(kind: str, config: Any, where: str = "$.data") -> list[Problem]:
    """Problems a run would meet when it builds the dataset ``kind`` with ``config``, by path."""
    if isinstance(config, MixConfig):
        return _mix_problems(config, where)
    problems: list[Problem] = []
    if isinstance(config, ImageOptions):
        try:
            bucket_setup(
                config.resolution, buckets=config.buckets, step=config.bucket_step,
                min_side=config.min_side, max_side=config.max_side,
            )  # fmt: skip
        except NoBucket as exc:
            problems.append(Problem(f"{where}.bucket_step" if config.buckets else f"{where}.resolution", str(exc)))
    if isinstance(config, FolderConfig) and not Path(config.path).expanduser().is_dir():
        problems.append(Problem(f"{where}.path", f"folder not found: {config.path}"))
    if isinstance(config, MetadataConfig) and not Path(config.file).expanduser().is_file():
        problems.append(Problem(f"{where}.file", f"metadata file not found: {config.file}"))
    return problems


def _mix_problems(config: MixConfig, where: str) -> list[Problem]:
    from diffcore.api import component_config

    problems: list[Problem] = []
    for i, (section, _, _) in enumerate(parse_mix(config.datasets, where)):
        path = f"{where}.datasets[{i}]"
        options = dict(section)
        kind = options.pop("type")
        try:
            nested = component_config("dataset", kind, options, where=path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except UserError as exc:
            problems.append(Problem(exc.where or path, exc.message))
            continue
        problems.extend(data_problems(kind, nested, path))
    return problems
