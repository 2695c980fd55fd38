"""Classifier-free guidance with the guidance rescale of Lin et al. (2023), sec. 3.4."""

from __future__ import annotations

import torch


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """uncond + scale (cond - uncond); with ``rescale`` > 0 the result's per-sample std is pulled
    toward the conditional output's (fixes over-exposure with zero-terminal-SNR schedules)."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * (guided * factor) + (1 - rescale) * guided
    return guided
