"""Exponential moving average of the trainable weights, kept in float32.

The decay follows diffusers' ``EMAModel`` so that runs compare with scripts built on it: until
``start_step`` (its ``update_after_step``) the average simply copies the weights, so the random
initial weights never linger in it; after that the decay ramps up with the steps averaged,
``1 - (1 + n / inv_gamma) ** -power`` (its ``use_ema_warmup``), at most ``decay`` and at least
``min_decay``. Without the warm-up the decay is ``decay`` from the first average on. The decay is a
function of the step alone, so a resumed run averages exactly as a straight one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

#: header entry of an EMA file exported in the layout of model.safetensors / adapter.safetensors
EMA_EXPORT_MARK = ("diffcore.weights", "ema")


def is_ema_export(path: Path) -> bool:
    """Whether ``path`` holds EMA weights in the export layout (older runs wrote the EMA's own state,
    keyed by trained-parameter name, under the same name ``ema.safetensors``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get(EMA_EXPORT_MARK[0]) == EMA_EXPORT_MARK[1]


def ema_decay_at(
    step: int,
    decay: float,
    *,
    warmup: bool = True,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
    start_step: int = 0,
) -> float:
    """The decay the EMA applies at optimizer step ``step`` (1 for the first update); 0 means the
    average takes the weights as they are."""
    n = max(0, step - start_step - 1)
    if n == 0:
        return 0.0
    value = 1.0 - (1.0 + n / inv_gamma) ** -power if warmup else decay
    return max(min(value, decay), min_decay)


class EMA:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        names: list[str],
        decay: float,
        *,
        warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        start_step: int = 0,
    ):
        self.decay = decay
        self.warmup = warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_decay = min_decay
        self.start_step = start_step
        self.params = params
        self.names = names
        self.shadow = [p.detach().float().clone() for p in params]

    def decay_at(self, step: int) -> float:
        """The decay of the update made after optimizer step ``step``."""
        return ema_decay_at(
            step, self.decay, warmup=self.warmup, inv_gamma=self.inv_gamma, power=self.power,
            min_decay=self.min_decay, start_step=self.start_step,
        )  # fmt: skip

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step ``step`` (counted from 1)."""
        weight = 1.0 - self.decay_at(step)
        for s, p in zip(self.shadow, self.params):
            if weight == 1.0:
                s.copy_(p.detach())
            else:
                s.lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (evaluation, sampling), then the live ones back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
