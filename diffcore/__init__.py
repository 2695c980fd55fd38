"""diffcore: a plugin-based trainer for image diffusion models.

The public API a plugin may use: the hook markers, the registration records, the errors, and the
loaders below. Importing this package is cheap (no torch); heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffcore.builtin.samplers import X0Options
from diffcore.errors import ConfigError, DiffcoreError, PluginError, Problem, TrainingError, UserError
from diffcore.hookspecs import hookimpl, hookspec
from diffcore.records import (
    AdapterSpec,
    AutoencoderSpec,
    CallbackSpec,
    CommandSpec,
    ComponentSpec,
    DatasetSpec,
    LossWeightingSpec,
    MethodSpec,
    ModelSpec,
    OptimizerSpec,
    SamplerSpec,
    SchedulerSpec,
    TextEncoderSpec,
)
from diffcore.version import PLUGIN_API, __version__

__all__ = [
    "AdapterSpec",
    "AutoencoderSpec",
    "CallbackSpec",
    "CommandSpec",
    "ComponentSpec",
    "ConfigError",
    "DatasetSpec",
    "DiffcoreError",
    "LossWeightingSpec",
    "MethodSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PLUGIN_API",
    "PluginError",
    "Problem",
    "SamplerSpec",
    "SchedulerSpec",
    "TextEncoderSpec",
    "TrainingError",
    "UserError",
    "X0Options",
    "__version__",
    "build_component",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_autoencoder",
    "load_model",
    "load_scheduler",
]

if TYPE_CHECKING:
    from diffcore.api import build_component, load_autoencoder, load_model, load_scheduler
    from diffcore.registry import get_registry

_LAZY = {
    "load_model": "diffcore.api",
    "load_autoencoder": "diffcore.api",
    "load_scheduler": "diffcore.api",
    "build_component": "diffcore.api",
    "get_registry": "diffcore.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffcore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
