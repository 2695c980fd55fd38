"""Typed records that plugins yield from the registration hooks.

Every component record carries a ``name`` (what a job's ``type:`` selects), an attrs ``config``
class (the section's other keys are structured into it, unknown keys rejected) and a ``factory``.
A command record carries its argparse set-up and its ``run`` instead. Records are plain data:
building one must not import torch. Which hook yields which record is in :mod:`diffcore.kinds`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from diffcore.layouts import LayoutProbe

_NAME_CHARS = "-_.+"


def _name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in _NAME_CHARS for c in value):
        raise ValueError(f"component name {value!r} must be letters, digits, '-', '_', '.' or '+'")


@attrs.frozen(kw_only=True)
class Record:
    """What every registration record has: the name a user selects it by and one line about it."""

    name: str = attrs.field(validator=_name)
    description: str = ""


@attrs.frozen(kw_only=True)
class ComponentSpec(Record):
    """A component built from a config section. The registry rejects a ``config`` that is not an
    attrs class."""

    config: type = attrs.field()
    factory: Callable[..., Any] = attrs.field()


@attrs.frozen(kw_only=True)
class ModelSpec(ComponentSpec):
    """A model architecture. ``factory(config) -> DiffusionModel`` (see :mod:`diffcore.model`).

    ``cache_aware``: the config has a ``load_encoders: bool`` field, and the kernel sets it false
    when the job's latent/text cache holds everything the encoders would compute.

    ``detect(probe) -> "original" | "diffusers" | None``: which of this architecture's published
    layouts a weights file or folder is in, judged from its tensor names, shapes and configs (a
    :class:`diffcore.layouts.LayoutProbe`; torch-free), None when it is not this architecture's.
    ``diffcore convert`` asks every model; None (the default) recognises nothing."""

    cache_aware: bool = False
    detect: Callable[[LayoutProbe], str | None] | None = None


@attrs.frozen(kw_only=True)
class SchedulerSpec(ComponentSpec):
    """A noise schedule with its training objective. ``factory(config) -> Scheduler``."""


@attrs.frozen(kw_only=True)
class AdapterSpec(ComponentSpec):
    """A parameter-efficient adapter. ``factory(config) -> Adapter``.

    ``detect(probe) -> file format | None``: the format (e.g. "kohya", "peft") of an adapter file
    this component reads, from its tensor names (torch-free); None when it is not one. ``diffcore
    convert`` asks every adapter; None (the default) recognises nothing.

    ``validate(job) -> list[Problem]``: what the adapter cannot train with (text encoders to train
    while a feature cache would hold their outputs, say), found by ``diffcore validate`` and before a
    run loads its model; None: nothing to check."""

    detect: Callable[[LayoutProbe], str | None] | None = None
    validate: Callable[[Any], list[Any]] | None = None


@attrs.frozen(kw_only=True)
class DatasetSpec(ComponentSpec):
    """A source of training examples. ``factory(config) -> Dataset``."""


@attrs.frozen(kw_only=True)
class CallbackSpec(ComponentSpec):
    """Something that reacts to training events. ``factory(config) -> Callback``."""


@attrs.frozen(kw_only=True)
class MethodSpec(ComponentSpec):
    """How a batch becomes a loss. ``factory(config) -> Method``."""


@attrs.frozen(kw_only=True)
class OptimizerSpec(ComponentSpec):
    """An optimizer. ``factory(params, config, lr) -> torch.optim.Optimizer``.

    ``set_mode(optimizer, training)``: for an optimizer whose weights differ between training and
    evaluation (schedule-free methods train at one point and evaluate at another): the loop calls it
    with ``True`` before it trains and ``False`` while it evaluates, samples, checkpoints or exports
    (see :meth:`diffcore.TrainContext.optimizer_evaluating`). It moves the weights it steps in place:
    the module's own (ZeRO 0 without mixed precision) or DeepSpeed's fp32 partitions (ZeRO 1-2), which
    the loop then copies into the module; other setups are refused. None (the default): the weights
    are the same in both.

    ``validate(job) -> list[Problem]``: what the optimizer cannot run with (its library missing, a
    ZeRO stage or precision it cannot follow), found by ``diffcore validate`` and before a run loads
    its model; None: nothing to check."""

    set_mode: Callable[[Any, bool], None] | None = None
    validate: Callable[[Any], list[Any]] | None = None


@attrs.frozen(kw_only=True)
class AutoencoderSpec(ComponentSpec):
    """An image autoencoder family (``sdxl``, ``flux``...). ``factory(config) -> Autoencoder``."""


@attrs.frozen(kw_only=True)
class SamplerSpec(ComponentSpec):
    """A sampler. ``factory(config) -> Sampler`` (see :class:`diffcore.diffusion.samplers.Sampler`)."""


@attrs.frozen(kw_only=True)
class TextEncoderSpec(ComponentSpec):
    """A text encoder family (CLIP, T5, decoder LLMs...). ``factory(config) -> TextEncoder``."""


@attrs.frozen(kw_only=True)
class LossWeightingSpec(ComponentSpec):
    """A per-sample loss weighting. ``factory(config) -> LossWeighting`` with
    ``weight(t, scheduler, prediction_type) -> Tensor (n,)``."""


@attrs.frozen(kw_only=True)
class CommandSpec(Record):
    """A ``diffcore <name>`` subcommand. ``add_arguments(parser)`` declares its options (keep it
    torch-free: ``diffcore --help`` builds every command's parser); ``run(args) -> int`` is the exit
    status. A :class:`~diffcore.errors.UserError` it raises exits 2 with its message."""

    add_arguments: Callable[[argparse.ArgumentParser], None] = attrs.field()
    run: Callable[[argparse.Namespace], int] = attrs.field()
