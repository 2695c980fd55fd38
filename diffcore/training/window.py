"""The logging window: losses and method logs summed on the device, read back once per logged step.

Reading a loss with ``float(loss)`` waits for the GPU every micro-step. Instead every value stays a
device tensor until the window closes (a logged step, a checkpoint, the last step); then one
reduction over ranks and one copy to the host serve the whole window. A non-finite loss is
remembered with the step it happened in, so the run still stops naming that step, before any
checkpoint could keep its weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from diffcore.training.distributed import all_mean_tensor, all_min_tensor


class LossWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self._reset()
        self.bad_step = torch.full((), math.inf, device=device, dtype=torch.float64)
        self.bad_value = torch.zeros((), device=device, dtype=torch.float64)

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.last = torch.zeros((), device=self.device, dtype=torch.float64)
        self.logs: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add_micro(self, loss: torch.Tensor, logs: Mapping[str, torch.Tensor | float], step: int, share: float) -> None:
        """One micro-step's loss and logs, each weighted by ``share`` (1 / gradient accumulation)."""
        value = loss.detach().to(self.device, torch.float64)
        fresh = ~torch.isfinite(value) & torch.isinf(self.bad_step)
        self.bad_step = torch.where(fresh, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_value = torch.where(fresh, value, self.bad_value)
        self.last = self.last + value * share
        for key, v in logs.items():
            v = torch.as_tensor(v).detach().to(self.device, torch.float64)
            self.logs[key] = self.logs.get(key, torch.zeros_like(v)) + v * share

    def end_step(self) -> torch.Tensor:
        """Close the optimizer step; its loss (a device tensor, mean over micro-steps)."""
        last, self.last = self.last, torch.zeros_like(self.last)
        self.loss = self.loss + last
        self.steps += 1
        return last

    def first_bad(self) -> tuple[int, float] | None:
        """(step, value) of the first non-finite loss on any rank, or None. Synchronises."""
        step = float(all_min_tensor(self.bad_step.reshape(1)).item())
        if math.isinf(step):
            return None
        local = float(self.bad_step.item())
        return int(step), float(self.bad_value.item()) if local == step else math.nan

    def close(self) -> dict[str, float]:
        """The window's mean loss and logs over ranks and steps; starts a new window."""
        keys = sorted(self.logs)
        stacked = torch.stack([self.loss, *(self.logs[k] for k in keys)]) / max(self.steps, 1)
        values = all_mean_tensor(stacked).tolist()
        self._reset()
        return {"loss": values[0], **dict(zip(keys, values[1:]))}
