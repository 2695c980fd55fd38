"""What a job's components find wrong with it before anything heavy loads.

``diffcore validate``, ``doctor`` and ``plan`` report these problems together; a run refuses to start
on the optimizer's and adapter's (the dataset and method judge themselves again as they are built).
"""

from __future__ import annotations

from typing import Any

from diffcore.errors import ConfigError, Problem
from diffcore.registry import get_registry


def spec_problems(job: Any) -> list[Problem]:
    """The problems the job's optimizer (``OptimizerSpec.validate``, default ``adamw``) and adapter
    (``AdapterSpec.validate``) find in ``job``: a missing library, a setting they cannot run with."""
    registry = get_registry()
    specs = [registry.get("optimizer", job.optimizer.type if job.optimizer is not None else "adamw").spec]
    if job.adapter is not None:
        specs.append(registry.get("adapter", job.adapter.type).spec)
    return [problem for spec in specs if spec.validate is not None for problem in spec.validate(job)]


def job_problems(job: Any) -> list[Problem]:
    """Every problem found without loading a model: the data's (bucket feasibility, missing paths),
    the method's cross-section checks, and the optimizer's and adapter's."""
    from diffcore.api import build_component
    from diffcore.data.preflight import data_problems

    method = build_component("method", job.method.type, job.method.config)
    return [*data_problems(job.data.type, job.data.config), *method.validate(job), *spec_problems(job)]


def check_specs(job: Any) -> None:
    """Raise a :class:`ConfigError` with the optimizer's and adapter's problems, if any (before a run
    loads its model)."""
    problems = spec_problems(job)
    if problems:
        raise ConfigError(problems, source=job.source)
