"""The job's optimizer judges the job (``OptimizerSpec.validate``): a missing library or a setting it
cannot run with is reported before any model loads."""

from __future__ import annotations

from typing import Any

from diffcore.errors import ConfigError, Problem
from diffcore.registry import get_registry


def optimizer_problems(job: Any) -> list[Problem]:
    """The problems the job's ``train.optimizer`` (default ``adamw``) finds in ``job``."""
    name = job.optimizer.type if job.optimizer is not None else "adamw"
    spec = get_registry().get("optimizer", name).spec
    return list(spec.validate(job)) if spec.validate is not None else []


def check_optimizer(job: Any) -> None:
    """Raise a :class:`ConfigError` with the optimizer's problems, if any (before a run loads its model)."""
    problems = optimizer_problems(job)
    if problems:
        raise ConfigError(problems, source=job.source)
