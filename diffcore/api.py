"""Building components from Python, the way a job section builds them."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs

from diffcore.config.structure import structure
from diffcore.errors import ConfigError, Problem, UserError
from diffcore.quantize.active import paused
from diffcore.quantize.modes import MODES
from diffcore.registry import get_registry


def component_config(kind: str, name: str, options: Mapping[str, Any] | None = None, *, where: str = "$") -> Any:
    """Structure ``options`` into the config class of component ``name`` of ``kind``."""
    entry = get_registry().get(kind, name, where=f"{where}.type")
    return structure(dict(options or {}), entry.spec.config, where)


def build_component(kind: str, name: str, options: Mapping[str, Any] | None = None, *args: Any) -> Any:
    """Build component ``name`` of ``kind`` from plain options (as a job section would)."""
    entry = get_registry().get(kind, name)
    config = options if attrs.has(type(options)) else component_config(kind, name, options)
    if kind == "autoencoder":
        # the autoencoder a model's factory builds for itself loads at full precision:
        # model.quantize covers the backbone and the text encoders
        with paused():
            return _build(entry, kind, name, config, args)
    return _build(entry, kind, name, config, args)


def _build(entry: Any, kind: str, name: str, config: Any, args: tuple[Any, ...]) -> Any:
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


def load_model(type: str, pretrained: str | None = None, *, quantize: str = "none", **options: Any) -> Any:
    """A model by its registered name: from a diffusers folder, an original single file, or random
    init (``pretrained=None``). Options are the model's config keys; ``quantize`` is the kernel's
    ``model.quantize`` (``none``, ``int8``, ``fp8``, ``nf4``)."""
    if pretrained is not None:
        options["pretrained"] = str(pretrained)
    return build_model(type, options, quantize=quantize)


def build_model(
    name: str, options: Any, *, quantize: str = "none", device: Any = None, mixed_precision: str = "no"
) -> Any:
    """Model ``name`` built from its options or structured config, its frozen base quantised as it
    loads when ``quantize`` is not ``none`` (a job's ``model.quantize``; ``device``: where it will
    run, checked against what the mode's library supports; ``mixed_precision``: the job's
    ``train.mixed_precision``)."""
    if quantize == "none":
        return build_component("model", name, options)
    if quantize not in MODES:
        raise UserError(f"must be one of {', '.join(MODES)}, got {quantize!r}", where="$.model.quantize")
    from diffcore.quantize.build import build_quantized

    return build_quantized(quantize, lambda: build_component("model", name, options), device, mixed_precision)


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
