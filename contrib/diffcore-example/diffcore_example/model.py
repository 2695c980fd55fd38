"""A tiny class-conditional denoiser built on diffcore's public model base class."""

from __future__ import annotations

import torch
from torch import nn

from diffcore.model import DiffusionModel
from diffcore.nn import timestep_embedding
from diffcore.weights import Checkpoint, load_into


class TinyDenoiser(nn.Module):
    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.width = width
        self.label_emb = nn.Embedding(num_classes + 1, width)  # last row: the null class
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.width).to(x.dtype) + self.label_emb(labels)
        scale, shift = self.time_mlp(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv_in(x)
        h = h + self.body(h) * (1 + scale) + shift
        return self.conv_out(h)


class TinyModel(DiffusionModel):
    def __init__(self, config):
        backbone = TinyDenoiser(config.channels, config.width, config.num_classes)
        if config.pretrained:
            load_into(backbone, Checkpoint(config.pretrained).items(), where=config.pretrained)
        super().__init__(backbone, latent_channels=config.channels)
        self.prediction_type = config.prediction_type
        self.null_label = config.num_classes
        self.adapter_targets = [r"time_mlp\.\d+", r"body\.2"]

    @property
    def default_scheduler(self) -> dict:
        if self.prediction_type == "flow":
            return {"type": "flow"}
        return {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}

    def encode_conditions(self, batch):
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("example-tiny is class-conditional: the batch needs labels")
        return torch.as_tensor(labels, device=self.device).long()

    def predict(self, noisy_latents, t, cond, **extra):
        dtype = self.dtype
        return self.backbone(noisy_latents.to(dtype), t.to(self.device).float(), cond)
