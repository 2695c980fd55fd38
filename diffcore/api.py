"""Building components from Python, the way a job section builds them."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs

from diffcore.config.structure import structure
from diffcore.errors import ConfigError, Problem
from diffcore.registry import get_registry


def component_config(kind: str, name: str, options: Mapping[str, Any] | None = None, *, where: str = "$") -> Any:
    """Structure ``options`` into the config class of component ``name`` of ``kind``."""
    entry = get_registry().get(kind, name, where=f"{where}.type")
    return structure(dict(options or {}), entry.spec.config, where)


def build_component(kind: str, name: str, options: Mapping[str, Any] | None = None, *args: Any) -> Any:
    """Build component ``name`` of ``kind`` from plain options (as a job section would)."""
    entry = get_registry().get(kind, name)
    config = options if attrs.has(type(options)) else component_config(kind, name, options)
    if kind == "dataset":
        # composite datasets (mix) build their nested sections through this, not the global registry
        built = entry.spec.factory(config, functools.partial(build_section, "dataset"))
    else:
        built = entry.spec.factory(*args, config) if args else entry.spec.factory(config)
    if kind == "model":
        # the registered name is what files record as the architecture, whatever the plugin's class
        built.architecture = name
    return built


def build_section(kind: str, section: Mapping[str, Any], where: str) -> Any:
    """Structure and build a nested section (``{type: NAME, **options}``) of ``kind``; problems are
    reported at ``where`` (``$.data.datasets[0]``...)."""
    options = dict(section)
    name = options.pop("type", None)
    if not isinstance(name, str) or not name:
        raise ConfigError([Problem(f"{where}.type", f"required: the {kind} to use")])
    config = component_config(kind, name, options, where=where)
    return build_component(kind, name, config)


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
