"""Per-sample loss weights: the formulas, and the loss weightings a job selects with
``train.loss_weighting`` independently of its noise schedule (records in
``diffcore.builtin.loss_weightings``; :func:`diffcore.api.build_loss_weighting` builds the job's).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import attrs
import torch


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) for a loss on ``prediction_type``'s target.

    The paper's weight on the x0 loss is min(snr, gamma); in eps units that is min(snr, gamma) / snr,
    in v units min(snr, gamma) / (snr + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "eps":
        # a zero-terminal-SNR step has snr = 0, where the ratio's limit is 1
        return torch.where(
            snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr)
        )
    if prediction_type == "v":
        return clipped / (snr + 1)
    if prediction_type == "x0":
        return clipped
    raise ValueError(f"min-SNR weighting is defined for eps, v and x0 targets, not {prediction_type!r}")


def flow_weight(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    """SD3-style flow weightings: none, sigma_sqrt (1 / sigma^2), cosmap (2 / (pi (1 - 2s + 2s^2)))."""
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        # uniform sampling can draw sigma = 0 exactly; cap the weight rather than return inf
        return sigma.clamp(min=1e-4) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown flow weighting {scheme!r}")


# -- loss weightings selectable in the job (train.loss_weighting) ---------------------------------
class LossWeighting(Protocol):
    """What a ``diffcore_register_loss_weightings`` record's factory builds."""

    def weight(self, t: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
        """The weight (n,) of each sample's loss on ``prediction_type``'s target at model time t,
        float32 on t's device. ``scheduler.alpha_sigma(t)`` gives the path coefficients."""
        ...


def _path(t: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
    alpha, sigma = scheduler.alpha_sigma(t)
    return alpha.double(), sigma.double()


def flow_time(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow time s with the same signal-to-noise ratio as (alpha, sigma):
    s / (1 - s) = sigma / alpha. On a flow path it is sigma itself."""
    return sigma / (alpha + sigma)


@attrs.frozen
class NoWeighting:
    """Every sample weighs 1."""

    def weight(self, t: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
        return torch.ones(t.shape, device=t.device, dtype=torch.float32)


@attrs.frozen
class MinSNRWeighting:
    """Min-SNR-gamma: min(snr, gamma) on the x0 error, in the units of the model's target (eps:
    / snr, v: / (snr + 1), flow: times sigma^2, the x0 error per unit of flow-target error)."""

    gamma: float

    def weight(self, t: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
        alpha, sigma = _path(t, scheduler)
        snr = alpha**2 / sigma**2
        if prediction_type == "flow":
            w = torch.clamp(snr, max=self.gamma) * sigma**2
        else:
            w = min_snr_weight(snr.float(), self.gamma, prediction_type)
        return w.float().to(t.device)


@attrs.frozen
class FlowTimeWeighting:
    """SD3's sigma_sqrt or cosmap weighting of the flow time s (:func:`flow_time` for paths other
    than rectified flow), applied to the loss as it is."""

    scheme: str

    def weight(self, t: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
        alpha, sigma = _path(t, scheduler)
        return flow_weight(flow_time(alpha, sigma), self.scheme).float().to(t.device)


@attrs.frozen
class EDMWeighting:
    """EDM (Karras et al. 2022): lambda = (s^2 + sd^2) / (s sd)^2 on the x0 error, s = sigma / alpha
    the path's VE noise level, in the units of the model's target (eps: times s^2; v and flow:
    times sigma^2)."""

    sigma_data: float

    def weight(self, t: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
        alpha, sigma = _path(t, scheduler)
        sd2 = self.sigma_data**2
        if prediction_type == "eps":
            # at pure noise (zero terminal SNR) eps is x_t itself; weigh that step 1, as min-SNR does
            w = torch.where(
                alpha > 0, (sigma**2 + sd2 * alpha**2) / (sd2 * alpha.clamp(min=1e-10) ** 2), torch.ones_like(alpha)
            )
        elif prediction_type in ("v", "flow"):
            w = (sigma**2 + sd2 * alpha**2) / sd2
        elif prediction_type == "x0":
            w = (sigma**2 + sd2 * alpha**2) / (sd2 * sigma.clamp(min=1e-4) ** 2)
        else:
            raise ValueError(f"EDM weighting is defined for eps, v, x0 and flow targets, not {prediction_type!r}")
        return w.float().to(t.device)
