"""Per-sample loss weights."""

from __future__ import annotations

import math

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
