"""The DeepSpeed-backed training loop."""

from __future__ import annotations

from typing import Any


def run_job(job: Any, *, resume: bool = False) -> Any:
    """Train ``job`` (a :class:`diffcore.config.job.Job`); see :func:`diffcore.training.loop.run_job`."""
    from diffcore.training.loop import run_job as _run

    return _run(job, resume=resume)
