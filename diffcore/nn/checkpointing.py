"""Activation checkpointing that blocks opt into per instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool = True, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``, recomputing its activations in backward when ``enabled`` and
    gradients are on (non-reentrant, so kwargs and non-tensor arguments work)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
