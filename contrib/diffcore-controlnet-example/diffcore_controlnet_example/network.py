"""The networks: a denoiser with an entry for a residual, and the side network producing it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.nn import timestep_embedding


class ResidualDenoiser(nn.Module):
    """conv_in -> (+ time/class embedding, + residual) -> body -> conv_out; the residual is added to
    the hidden feature map of ``width`` channels, where a ControlNet adds its zero-conv outputs."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.width = width
        self.label_emb = nn.Embedding(num_classes + 1, width)  # the last row is the null class
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width).to(x.dtype)) + self.label_emb(labels)
        h = self.conv_in(x) + emb[:, :, None, None]
        if residual is not None:
            h = h + residual.to(h.dtype)
        return self.conv_out(h + self.body(h))


class SideNet(nn.Module):
    """Reads the control image with the noisy latents and the time, and returns a residual for the
    denoiser's hidden features. The output conv starts at zero, so training starts from the frozen
    model's own predictions."""

    def __init__(self, latent_channels: int, control_channels: int, width: int, out_channels: int):
        super().__init__()
        self.width = width
        self.time_proj = nn.Linear(width, width)
        self.conv_in = nn.Conv2d(latent_channels + control_channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.zero_out = nn.Conv2d(width, out_channels, 1)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)

    def forward(self, noisy: torch.Tensor, control: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        emb = self.time_proj(timestep_embedding(t, self.width).to(dtype))
        h = F.silu(self.conv_in(torch.cat([noisy.to(dtype), control.to(dtype)], dim=1)) + emb[:, :, None, None])
        return self.zero_out(F.silu(self.conv_mid(h)))
