"""Typed records that plugins yield from the registration hooks.

Every record carries a ``name`` (what a job's ``type:`` selects), an attrs ``config`` class
(the section's other keys are structured into it, unknown keys rejected) and a ``factory``.
Records are plain data: building one must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


def _name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"component name {value!r} must be letters, digits, '-', '_' or '.'")


@attrs.frozen(kw_only=True)
class ComponentSpec:
    """What every registration record has."""

    name: str = attrs.field(validator=_name)
    config: type = attrs.field()
    factory: Callable[..., Any] = attrs.field()
    description: str = ""

    kind: str = attrs.field(init=False, default="component")


@attrs.frozen(kw_only=True)
class ModelSpec(ComponentSpec):
    """A model architecture. ``factory(config) -> Model`` (see :mod:`diffcore.protocols`)."""

    kind: str = attrs.field(init=False, default="model")


@attrs.frozen(kw_only=True)
class SchedulerSpec(ComponentSpec):
    """A noise schedule with its training objective. ``factory(config) -> Scheduler``."""

    kind: str = attrs.field(init=False, default="scheduler")


@attrs.frozen(kw_only=True)
class AdapterSpec(ComponentSpec):
    """A parameter-efficient adapter. ``factory(config) -> Adapter``."""

    kind: str = attrs.field(init=False, default="adapter")


@attrs.frozen(kw_only=True)
class DatasetSpec(ComponentSpec):
    """A source of training examples. ``factory(config) -> Dataset``."""

    kind: str = attrs.field(init=False, default="dataset")


@attrs.frozen(kw_only=True)
class CallbackSpec(ComponentSpec):
    """Something that reacts to training events. ``factory(config) -> Callback``."""

    kind: str = attrs.field(init=False, default="callback")


@attrs.frozen(kw_only=True)
class MethodSpec(ComponentSpec):
    """How a batch becomes a loss. ``factory(config) -> Method``."""

    kind: str = attrs.field(init=False, default="method")


@attrs.frozen(kw_only=True)
class OptimizerSpec(ComponentSpec):
    """An optimizer. ``factory(params, config, lr) -> torch.optim.Optimizer``."""

    kind: str = attrs.field(init=False, default="optimizer")


@attrs.frozen(kw_only=True)
class AutoencoderSpec(ComponentSpec):
    """An image autoencoder family (``sdxl``, ``flux``...). ``factory(config) -> Autoencoder``."""

    kind: str = attrs.field(init=False, default="autoencoder")


KINDS: dict[str, type[ComponentSpec]] = {
    "model": ModelSpec,
    "scheduler": SchedulerSpec,
    "adapter": AdapterSpec,
    "dataset": DatasetSpec,
    "callback": CallbackSpec,
    "method": MethodSpec,
    "optimizer": OptimizerSpec,
    "autoencoder": AutoencoderSpec,
}
