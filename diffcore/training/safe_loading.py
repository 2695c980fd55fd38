"""DeepSpeed's resume state read without unpickling arbitrary objects.

DeepSpeed writes its state with ``torch.save``; diffcore reads it back with
``torch.load(weights_only=True)`` and an allow-list of the few non-tensor classes DeepSpeed stores,
so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def use_safe_loading(engine: Any) -> None:
    """Make DeepSpeed read its own resume state with ``torch.load(weights_only=True)``."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_diffcore_safe", False):
        return

    def load(path: str, map_location: Any = None) -> Any:
        allow_deepspeed_globals()
        return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    ce._diffcore_safe = True


def allow_deepspeed_globals() -> None:
    """The non-tensor objects DeepSpeed puts in its state files, allowed by name (no arbitrary code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    import argparse
    import collections

    allowed += [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set]
    torch.serialization.add_safe_globals(allowed)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside reads with ``weights_only=True`` and DeepSpeed's allow-list."""
    allow_deepspeed_globals()
    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
