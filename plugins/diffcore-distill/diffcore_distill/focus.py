"""``focus``: a share of the training draws moved onto the noise levels a few-step sampler evaluates
(reflow's times, consistency's solver intervals), where a few-step student must be good."""

from __future__ import annotations

from typing import Any

import torch

from diffcore.context import StepRandom
from diffcore.errors import Problem


def check_focus(config: Any, where: str, problems: list[Problem]) -> None:
    """``focus`` in [0, 1]; when on, ``focus_steps`` are step counts of at least 1."""
    if not 0.0 <= config.focus <= 1.0:
        problems.append(Problem(f"{where}.focus", f"must be in [0, 1], got {config.focus}"))
    if config.focus > 0 and (not config.focus_steps or min(config.focus_steps) < 1):
        problems.append(Problem(f"{where}.focus_steps", f"must be step counts of at least 1, got {config.focus_steps}"))


def focused(rand: StepRandom, n: int, share: float, choices: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """``drawn`` (n values on the host) with each replaced, at probability ``share``, by one of
    ``choices`` drawn uniformly; two draws from ``rand`` in a fixed order, so resume stays exact."""
    pick = rand.randint(len(choices), n)
    return torch.where(rand.rand(n).cpu() < share, choices[pick], drawn.cpu())
