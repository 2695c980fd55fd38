"""The hook specifications a diffcore plugin implements.

A plugin is a module (named by an entry point in the ``diffcore.plugins`` group) holding functions
marked with ``diffcore.hookimpl``. Each registration hook returns an iterable of records from
:mod:`diffcore.records`. Importing that module must stay cheap: no torch, deepspeed or transformers
at import time; import them inside the factories.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from diffcore.records import (
    AdapterSpec,
    AutoencoderSpec,
    CallbackSpec,
    DatasetSpec,
    MethodSpec,
    ModelSpec,
    OptimizerSpec,
    SchedulerSpec,
)

PROJECT = "diffcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def diffcore_register_models() -> Iterable[ModelSpec]:
    """Model architectures: the backbone that trains plus how it encodes images and conditions."""


@hookspec
def diffcore_register_schedulers() -> Iterable[SchedulerSpec]:
    """Noise schedules with their training objectives (timestep sampling, targets, weighting)."""


@hookspec
def diffcore_register_adapters() -> Iterable[AdapterSpec]:
    """Adapters injected into a frozen model (LoRA, DoRA, LoKr...)."""


@hookspec
def diffcore_register_datasets() -> Iterable[DatasetSpec]:
    """Sources of training examples."""


@hookspec
def diffcore_register_callbacks() -> Iterable[CallbackSpec]:
    """Reactions to training events: logging, checkpoints, sampling."""


@hookspec
def diffcore_register_methods() -> Iterable[MethodSpec]:
    """Training methods: how a batch becomes a loss and which parameters train."""


@hookspec
def diffcore_register_optimizers() -> Iterable[OptimizerSpec]:
    """Optimizers beyond the built-in ones (8-bit, schedule-free...)."""


@hookspec
def diffcore_register_autoencoders() -> Iterable[AutoencoderSpec]:
    """Image autoencoder families that latent architectures ask for by name."""


HOOK_OF_KIND = {
    "model": "diffcore_register_models",
    "scheduler": "diffcore_register_schedulers",
    "adapter": "diffcore_register_adapters",
    "dataset": "diffcore_register_datasets",
    "callback": "diffcore_register_callbacks",
    "method": "diffcore_register_methods",
    "optimizer": "diffcore_register_optimizers",
    "autoencoder": "diffcore_register_autoencoders",
}
