"""The model contract object around :class:`ResidualDenoiser`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffcore.model import DiffusionModel
from diffcore_controlnet_example.network import ResidualDenoiser
from diffcore_controlnet_example.plugin import ResidualModelConfig


class ResidualModel(DiffusionModel):
    """Pixel space, eps prediction, class-conditional (labels); ``predict`` takes ``residual=``."""

    default_scheduler = {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}

    def __init__(self, config: ResidualModelConfig):
        super().__init__(ResidualDenoiser(config.channels, config.width, config.num_classes), latent_channels=config.channels)
        self.null_label = config.num_classes
        #: channels of the hidden feature map a residual is added to
        self.residual_channels = config.width

    def encode_conditions(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.as_tensor(batch["labels"], device=self.device).long()

    def predict(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        residual: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        return self.backbone(noisy_latents.to(self.dtype), t.to(self.device).float(), cond, residual)
