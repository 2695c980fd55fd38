"""``diffcore.testing``: helpers and pytest fixtures for plugin authors' test suites.

The counterpart of pytest's ``pytester`` for diffcore plugins. Importing it does not import torch, so
it can be loaded as a pytest plugin in every run: installed with diffcore through the ``pytest11``
entry point (nothing to do), or named in a root ``conftest.py`` as ``pytest_plugins = ["diffcore.testing"]``.

What it offers (plain functions; the fixtures below are thin wrappers):

- :func:`plugins_registered` / :func:`registry_with`: register plugin objects (a module or object with
  ``@diffcore.hookimpl`` functions) in-process, without pip, in a fresh registry with the built-ins;
  the context manager installs it process-wide and restores the previous one afterwards.
- :func:`fake_context`: a :class:`diffcore.TrainContext` on CPU without DeepSpeed (a tiny model,
  scheduler and dataset unless given; ``step_random`` set), to unit-test a method's ``loss``;
  :func:`first_batch` collates a dataset's first items like the loop does.
- :func:`run_job`: write a job dict as ``job.yaml`` and train it, in-process or as a ``diffcore run``
  subprocess (``processes=2`` launches torchrun); returns the output folder and parsed metrics.
  :func:`run_cli` runs any ``diffcore`` command in a subprocess with in-process plugins registered.
- :func:`assert_light_import` / :func:`assert_entry_points_light`: a plugin's entry module imports no
  torch, deepspeed or transformers (checked in a fresh interpreter).
- :func:`compare_with_reference` / :func:`assert_outputs_close`: the same random weights in a model
  and its reference, the same inputs, the largest difference within a tolerance.
- :func:`assert_text_encoders_train`: a text-encoder adapter on a model trains (its parameters move,
  the conditioning changes) and frozen text encoders build no autograd graph.

Fixtures: ``diffcore_plugins`` (a function registering plugin objects for the test), ``diffcore_run``
(:func:`run_job` with output under the test's ``tmp_path``) and ``diffcore_context`` (:func:`fake_context`).
docs/testing.md has examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from diffcore.testing.imports import assert_entry_points_light, assert_light_import
from diffcore.testing.jobs import JobRun, run_cli, run_job
from diffcore.testing.registration import plugins_registered, registry_with

if TYPE_CHECKING:
    from diffcore.testing.conditioning import assert_text_encoders_train
    from diffcore.testing.context import TinyModel, fake_context, first_batch
    from diffcore.testing.parity import assert_outputs_close, compare_with_reference

__all__ = [
    "JobRun",
    "TinyModel",
    "assert_entry_points_light",
    "assert_light_import",
    "assert_outputs_close",
    "assert_text_encoders_train",
    "compare_with_reference",
    "fake_context",
    "first_batch",
    "plugins_registered",
    "registry_with",
    "run_cli",
    "run_job",
]

# these import torch: loaded on first use
_LAZY = {
    "TinyModel": "diffcore.testing.context",
    "fake_context": "diffcore.testing.context",
    "first_batch": "diffcore.testing.context",
    "assert_outputs_close": "diffcore.testing.parity",
    "assert_text_encoders_train": "diffcore.testing.conditioning",
    "compare_with_reference": "diffcore.testing.parity",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffcore.testing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


@pytest.fixture
def diffcore_plugins() -> Iterator[Callable[..., Any]]:
    """``register(*plugins, autoload=False)``: install a fresh registry holding the built-ins and
    ``plugins`` (plus the installed ones with ``autoload=True``) for this test; returns it."""
    with contextlib.ExitStack() as stack:

        def register(*plugins: object | str, autoload: bool = False) -> Any:
            return stack.enter_context(plugins_registered(*plugins, autoload=autoload))

        yield register


@pytest.fixture
def diffcore_run(tmp_path: Any) -> Callable[..., JobRun]:
    """:func:`run_job` whose output folder is ``tmp_path / name`` (``name`` defaults to "run")."""

    def run(job: dict[str, Any], name: str = "run", **options: Any) -> JobRun:
        return run_job(job, tmp_path / name, **options)

    return run


@pytest.fixture
def diffcore_context() -> Callable[..., Any]:
    """:func:`fake_context` (imports torch when called)."""
    from diffcore.testing.context import fake_context as make

    return make
