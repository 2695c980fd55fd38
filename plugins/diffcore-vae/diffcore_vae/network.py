"""The convolutional KL autoencoder shared by SD1.x/2.x, SDXL, SD3.5, Flux.1 and Flux.2.

Parameter names follow the diffusers layout (``encoder.down_blocks.0.resnets.0.conv1``...), so a
diffusers ``vae/`` folder loads without renaming and the original layouts are one key map away
(:mod:`diffcore_vae.convert`). The module maps pixels to posterior moments and latents back to pixels;
scaling, shifting and Flux.2's patchify/batch-norm live in :mod:`diffcore_vae.autoencoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.nn import attention, split_heads

_EPS = 1e-6


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when nothing needs its input for a backward pass: halves activation memory at inference.
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One statement per step so each intermediate is released as soon as the next exists: a
        # nested call would keep conv1's output alive through conv2 (one more full-size activation).
        h = _silu(self.norm1(x))
        h = self.conv1(h)
        h = _silu(self.norm2(h))
        h = self.conv2(h)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return h.add_(skip) if not (torch.is_grad_enabled() and h.requires_grad) else h + skip


class SelfAttention(nn.Module):
    """One head over all channels at the lowest resolution, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (split_heads(proj(tokens), 1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original models pad right and bottom only before a stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Level(nn.Module):
    """Resnets at one resolution, then an optional resample (``downsamplers``/``upsamplers``)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(layers)
            ]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, "downsamplers", getattr(self, "upsamplers", ())):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: list[int],
        layers: int,
        groups: int,
        attn: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(
            [
                Level(channels[max(i - 1, 0)], c, layers, groups, None if i == last else "down")
                for i, c in enumerate(channels)
            ]
        )
        self.mid_block = MidBlock(channels[-1], groups, attn)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        x = _silu(self.conv_norm_out(x))
        return self.conv_out(x)


class Decoder(nn.Module):
    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        channels: list[int],
        layers: int,
        groups: int,
        attn: bool,
    ):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attn)
        last = len(rev) - 1
        self.up_blocks = nn.ModuleList(
            [
                Level(rev[max(i - 1, 0)], c, layers + 1, groups, None if i == last else "up")
                for i, c in enumerate(rev)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        x = _silu(self.conv_norm_out(x))
        return self.conv_out(x)


class KLAutoencoderNet(nn.Module):
    """Encoder to Gaussian moments (mean, logvar along channels) and decoder back to pixels.

    With ``patch_channels`` set (Flux.2) it also holds ``bn``, the batch-norm whose running statistics
    normalise the patchified latents.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        latent_channels: int,
        block_out_channels: list[int],
        decoder_block_out_channels: list[int] | None = None,
        layers_per_block: int,
        norm_num_groups: int,
        use_quant_conv: bool,
        use_post_quant_conv: bool,
        mid_block_add_attention: bool,
        patch_channels: int | None = None,
        batch_norm_eps: float = 1e-4,
        batch_norm_momentum: float = 0.1,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            decoder_block_out_channels or block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        if patch_channels is not None:
            self.bn = nn.BatchNorm2d(
                patch_channels,
                eps=batch_norm_eps,
                momentum=batch_norm_momentum,
                affine=False,
                track_running_stats=True,
            )
        self.downscale = 2 ** (len(block_out_channels) - 1)

    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.encoder(pixels)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def patchify(z: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*p*q, H/p, W/q) with channels in (c, pi, pj) order."""
    b, c, h, w = z.shape
    return z.view(b, c, h // p, p, w // q, q).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * q, h // p, w // q)


def unpatchify(z: torch.Tensor, p: int, q: int) -> torch.Tensor:
    b, cpq, h, w = z.shape
    c = cpq // (p * q)
    return z.view(b, c, p, q, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * q)
