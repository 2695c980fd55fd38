"""Training targets and conversions between prediction types on any Gaussian path.

Every schedule here is a path x_t = alpha x0 + sigma noise (DDPM: alpha = sqrt(abar),
sigma = sqrt(1 - abar); rectified flow: alpha = 1 - s, sigma = s). The four prediction types are
linear in (x0, noise):
  eps  = noise
  x0   = x0
  v    = alpha noise - sigma x0            (Salimans & Ho)
  flow = noise - x0                        (the rectified-flow velocity)
so any of them converts to any other given x_t, alpha and sigma; that is what lets every sampler
drive every model. ``alpha`` and ``sigma`` are floats or tensors broadcastable against x.
"""

from __future__ import annotations

from typing import Any

import torch

PREDICTION_TYPES = ("eps", "v", "x0", "flow")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> torch.Tensor:
    """What a model of ``prediction_type`` should output for x_t = alpha x0 + sigma noise."""
    _check(prediction_type)
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return alpha * noise - sigma * x0
    return noise - x0


def to_x0_eps(
    output: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) implied by a model ``output`` of ``prediction_type`` at x_t = ``x``."""
    _check(prediction_type)
    if prediction_type == "eps":
        return (x - sigma * output) / alpha, output
    if prediction_type == "x0":
        return output, (x - alpha * output) / sigma
    if prediction_type == "v":
        # [x; v] = [[alpha, sigma], [-sigma, alpha]] [x0; noise]; the determinant is 1 on VP paths
        det = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * output) / det, (sigma * x + alpha * output) / det
    # x = (alpha + sigma) x0 + sigma u with u = noise - x0
    total = alpha + sigma
    return (x - sigma * output) / total, (x + alpha * output) / total


def to_x0(
    output: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> torch.Tensor:
    """The clean-sample estimate implied by a model output."""
    return to_x0_eps(output, x, alpha, sigma, prediction_type)[0]


def to_eps(
    output: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> torch.Tensor:
    """The noise estimate implied by a model output."""
    return to_x0_eps(output, x, alpha, sigma, prediction_type)[1]


def to_velocity(
    output: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> torch.Tensor:
    """The rectified-flow velocity noise - x0 implied by a model output."""
    if prediction_type == "flow":
        return output
    x0, eps = to_x0_eps(output, x, alpha, sigma, prediction_type)
    return eps - x0


def convert(
    output: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any, source: str, dest: str
) -> torch.Tensor:
    """A model output of type ``source`` re-expressed as type ``dest``."""
    if source == dest:
        return output
    x0, eps = to_x0_eps(output, x, alpha, sigma, source)
    return target(x0, eps, alpha, sigma, dest)
