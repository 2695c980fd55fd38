"""Classifier-free guidance with the guidance rescale of Lin et al. (2023), sec. 3.4, and skip-layer
guidance (Stability's SD3.5 sampling, as StableDiffusion3Pipeline applies it)."""

from __future__ import annotations

import attrs
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


@attrs.frozen
class SkipLayerGuidance:
    """Skip-layer guidance: on steps i with ``start * steps < i < stop * steps`` the guided output
    gains ``scale * (cond - skipped)``, ``skipped`` being the conditional prediction with the backbone
    blocks ``layers`` passed over."""

    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def active(self, step: int, steps: int) -> bool:
        return steps * self.start < step < steps * self.stop

    def apply(self, guided: torch.Tensor, cond: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
        return guided + self.scale * (cond - skipped)
