"""Learning-rate schedules with linear warmup, as multipliers of the base lr."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn
