"""Building components from Python, the way a job section builds them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from diffcore.config.structure import structure
from diffcore.registry import get_registry


def component_config(kind: str, name: str, options: Mapping[str, Any] | None = None, *, where: str = "$") -> Any:
    """Structure ``options`` into the config class of component ``name`` of ``kind``."""
    entry = get_registry().get(kind, name, where=f"{where}.type")
    return structure(dict(options or {}), entry.spec.config, where)


def build_component(kind: str, name: str, options: Mapping[str, Any] | None = None, *args: Any) -> Any:
    """Build component ``name`` of ``kind`` from plain options (as a job section would)."""
    entry = get_registry().get(kind, name)
    config = options if attrs.has(type(options)) else component_config(kind, name, options)
    return entry.spec.factory(*args, config) if args else entry.spec.factory(config)


def load_model(type: str, pretrained: str | None = None, **options: Any) -> Any:
    """A model by its registered name: from a diffusers folder, an original single file, or random
    init (``pretrained=None``). Options are the model's config keys."""
    if pretrained is not None:
        options["pretrained"] = str(pretrained)
    return build_component("model", type, options)


def load_autoencoder(family: str, pretrained: str | None = None, **options: Any) -> Any:
    """An autoencoder by family name (``sd``, ``sdxl``, ``sd3``, ``flux``, ``flux2``)."""
    if pretrained is not None:
        options["pretrained"] = str(pretrained)
    return build_component("autoencoder", family, options)


def load_scheduler(type: str, **options: Any) -> Any:
    """A noise schedule by its registered name (``ddpm``, ``flow``)."""
    return build_component("scheduler", type, options)


def build_loss_weighting(section: Any) -> Any:
    """The job's ``train.loss_weighting`` (a :class:`~diffcore.config.job.Section`) built, or None
    when the job has none (the scheduler's own ``loss_weight`` applies). The result has
    ``weight(t, scheduler, prediction_type) -> Tensor (n,)``."""
    if section is None:
        return None
    return get_registry().get("loss_weighting", section.type).spec.factory(section.config)
