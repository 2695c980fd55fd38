"""Built-in callbacks (records and configs only; no torch at import)."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.records import CallbackSpec


@attrs.define(kw_only=True)
class CheckpointConfig:
    """Checkpointing follows ``train.checkpoint_every`` and ``train.keep_last``; always on."""


@attrs.define(kw_only=True)
class MetricsConfig:
    """``metrics.jsonl`` in the output directory, one object per logged step; always on."""


@attrs.define(kw_only=True)
class ProgressConfig:
    enabled: bool = True


@attrs.define(kw_only=True)
class TensorBoardConfig:
    log_dir: str | None = None


@attrs.define(kw_only=True)
class SampleConfig:
    """Images during training, through the same code as ``diffcore sample``."""

    every: int = 0
    prompts: list[str] = attrs.Factory(list)
    labels: list[int] = attrs.Factory(list)
    count: int = 1
    steps: int = 30
    sampler: str = "euler"
    guidance: float = 4.0
    height: int | None = None
    width: int | None = None
    #: the sampler's own options (``clip_x0``, ``dynamic_threshold``...), as ``--sampler-option`` gives
    sampler_options: dict[str, Any] = attrs.Factory(dict)
    seed: int = 0
    at_end: bool = True
    #: the method's extra inference inputs by batch key, e.g. ``{control: edges.png}``
    inputs: dict[str, str] = attrs.Factory(dict)
    #: reference images of editing models (Kontext, Flux.2 multi-reference), as ``--reference``
    references: list[str] = attrs.Factory(list)
    #: inpainting mask of the first reference (white = repaint), as ``--mask``
    mask: str | None = None


@attrs.define(kw_only=True)
class ClassAgreementConfig:
    """At the end of training on the synthetic data: generate ``per_class`` samples of every class,
    save a grid per class and report the share whose class measured from the pixels agrees."""

    per_class: int = 16
    steps: int = 30
    sampler: str = "euler"
    sampler_options: dict[str, Any] = attrs.Factory(dict)
    guidance: float = 3.0
    seed: int = 1234


@attrs.define(kw_only=True)
class ReportConfig:
    """Keeps ``report.html`` in the output directory current (``diffcore run --report`` adds it)."""

    #: at most one rewrite per this many seconds at logged steps (checkpoints, samples and the end always rewrite)
    every_s: float = 30.0


def _factory(path: str):
    def build(config):
        import importlib

        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)(config)

    return build


def records() -> list:
    base = "diffcore.callbacks.builtin."
    return [
        CallbackSpec(name="checkpoint", config=CheckpointConfig, factory=_factory(base + "CheckpointCallback")),
        CallbackSpec(name="metrics", config=MetricsConfig, factory=_factory(base + "MetricsCallback")),
        CallbackSpec(name="progress", config=ProgressConfig, factory=_factory(base + "ProgressCallback")),
        CallbackSpec(name="tensorboard", config=TensorBoardConfig, factory=_factory(base + "TensorBoardCallback")),
        CallbackSpec(name="sample", config=SampleConfig, factory=_factory(base + "SampleCallback")),
        CallbackSpec(name="report", config=ReportConfig, factory=_factory("diffcore.report.callback.ReportCallback")),
        CallbackSpec(
            name="class_agreement", config=ClassAgreementConfig, factory=_factory(base + "ClassAgreementCallback")
        ),
    ]
