"""Optional packages a job's components would use, and whether they are installed (no imports: find_spec)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import attrs


@attrs.frozen
class Wanted:
    package: str
    why: str
    #: a run without it fails (True) or only loses a feature (False)
    required: bool


def wanted(job: Any) -> list[Wanted]:
    """Every optional package the job would use, installed or not."""
    out: list[Wanted] = []
    named = [c.type for c in job.callbacks]
    if "tensorboard" in named:
        out.append(Wanted("tensorboard", f"$.callbacks[{named.index('tensorboard')}] asks for TensorBoard logs", False))
    else:
        out.append(Wanted("tensorboard", "TensorBoard logs (written by default when it is installed)", False))
    optimizer = job.optimizer.type if job.optimizer is not None else "adamw"
    if "8bit" in optimizer or "bnb" in optimizer:
        out.append(Wanted("bitsandbytes", f"$.train.optimizer.type {optimizer} is a bitsandbytes optimizer", True))
    for path, value in _strings(job.to_dict()):
        low = value.lower()
        if any(word in low for word in ("float8", "fp8", "int8", "int4", "nf4")) and path.startswith("$.model"):
            out.append(Wanted("torchao", f"{path}: {value} is a quantised dtype", True))
            break
    return out


def missing(job: Any) -> list[Wanted]:
    """The wanted packages that are not installed."""
    return [w for w in wanted(job) if importlib.util.find_spec(w.package) is None]


def _strings(value: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _strings(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _strings(inner, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value
