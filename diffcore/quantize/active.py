"""Which quantisation is in force while a model loads (a context variable; torch-free)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import attrs


@attrs.define
class Plan:
    """One model's quantisation while it loads, and what it did."""

    mode: str
    #: where quantising happens and the quantised weights live: a CUDA device (the one the model will
    #: run on) quantises each weight there, much faster than the CPU; None: where ``load_into`` puts it
    device: str | None = None
    #: Linear weights quantised and their full-precision bytes
    quantized: int = 0
    full_bytes: int = 0
    #: selected Linear weights the mode could not hold (shapes NF4 cannot block): full precision
    skipped: list[str] = attrs.Factory(list)


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("diffcore_quantize", default=None)


def current() -> Plan | None:
    """The plan of the model loading now, or None (load at full precision)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def quantizing(mode: str, device: str | None = None) -> Iterator[Plan]:
    """Quantise the Linear weights that stream in through ``load_into`` while inside."""
    plan = Plan(mode, device)
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Load at full precision while inside (another component built inside a model's factory)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
