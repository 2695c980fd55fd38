"""Built-in commands (records only; each command's module loads when it is used).

``diffcore --help`` builds every command's parser, so the ``add_*_arguments`` functions and their
modules' top-level imports stay torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffcore.records import CommandSpec


def _lazy(module: str, name: str):
    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    call.__name__ = name
    return call


def _command(name: str, description: str) -> CommandSpec:
    module = f"diffcore.commands.{name}"
    return CommandSpec(
        name=name,
        description=description,
        add_arguments=_lazy(module, f"add_{name}_arguments"),
        run=_lazy(module, f"{name}_command"),
    )


def records() -> list[CommandSpec]:
    return [
        _command("run", "train a job"),
        _command("validate", "check a job without running it"),
        _command("plugins", "list installed plugins and what they register"),
        _command("sample", "generate images from a trained or pretrained model"),
        _command("cache", "precompute latent and text caches for a job"),
        _command("report", "write a run's report.html (curves, samples, job, plugins, checkpoints)"),
        _command("doctor", "check a job before it runs: buckets, crops, cache, one step's memory, packages"),
        _command("convert", "convert adapter and model files between layouts, or merge an adapter into a model"),
        _command("init", "write a commented job file for a model and method"),
        _command("plan", "predict a job's peak device memory and choose the cheapest settings that fit a GPU"),
    ]
