"""The conditional UNet of Stable Diffusion 1.x/2.x and SDXL.

Module names follow diffusers' ``UNet2DConditionModel`` exactly, so a diffusers ``unet/`` folder
loads without renaming and adapter keys map one to one. Layout, coarse to fine::

    conv_in -> down_blocks[i] (resnets, attentions, downsamplers) -> mid_block -> up_blocks[i]
            (resnets over [hidden, skip], attentions, upsamplers) -> conv_norm_out -> conv_out

Every resnet and spatial transformer can be recomputed in backward (``gradient_checkpointing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.nn import TimestepMLP, attention, checkpointed, split_heads, timestep_embedding
from diffcore_sdxl.config import UNetConfig


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """Multi-head attention; ``context`` None = self-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # a list so the projection is named ``to_out.0`` as in every published checkpoint
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            split_heads(proj(src), self.heads)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        return self.to_out[0](attention(q, k, v))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is the (rate 0) dropout slot; keeping it preserves the ``net.2`` name
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Group norm, project to tokens, transformer blocks, project back, residual."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        # SD1 projects with 1x1 convolutions, SD2/SDXL with linear layers (same maths, other shapes)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # upsample to the skip's size so latents that are not a multiple of 2**levels still work
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``resnets``, optional ``attentions`` and a resampler."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            self.attentions = nn.ModuleList(attentions)


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb: int, cfg: UNetConfig):
        super().__init__()
        groups, eps = cfg.norm_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(ch, ch, temb, groups, eps), ResnetBlock(ch, ch, temb, groups, eps)]
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    ch,
                    cfg.heads[-1],
                    cfg.transformer_layers[-1],
                    cfg.cross_attention_dim,
                    groups,
                    cfg.linear_projection,
                )
            ]
        )


class Encoder:
    """The down half of the UNet (time embedding, down levels, mid block), shared by :class:`UNet` and
    the ControlNet trunk that copies it; both hold ``config``, ``conv_in``, ``time_embedding``,
    ``add_embedding`` (SDXL), ``down_blocks``, ``mid_block`` and ``gradient_checkpointing``."""

    config: UNetConfig
    gradient_checkpointing: bool
    training: bool
    conv_in: nn.Conv2d
    time_embedding: nn.Module
    add_embedding: nn.Module
    down_blocks: nn.ModuleList
    mid_block: MidBlock

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        return checkpointed(module, *args, enabled=self.gradient_checkpointing and self.training)

    def _embed(
        self, x: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embedding(
            timestep_embedding(
                t, self.config.block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0
            ).to(x.dtype)
        )
        if self.config.addition_time_embed_dim is not None:
            if pooled is None or time_ids is None:
                raise ValueError("this UNet needs pooled text embeddings and time_ids (SDXL conditioning)")
            sizes = timestep_embedding(
                time_ids.reshape(-1),
                self.config.addition_time_embed_dim,
                flip_sin_to_cos=True,
                downscale_freq_shift=0,
            ).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1).to(emb.dtype))
        return emb

    def _down(
        self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down levels from ``conv_in``'s output: the last hidden state and every skip."""
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb)
                if hasattr(level, "attentions"):
                    h = self._run(level.attentions[j], h, context)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        return h, skips

    def _mid(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb)
        h = self._run(mid.attentions[0], h, context)
        return self._run(mid.resnets[1], h, emb)

    def _skip_channels(self) -> list[int]:
        """Channels of every skip tensor the down path pushes, in push order."""
        cfg = self.config
        skips = [cfg.block_out_channels[0]]
        for i, out in enumerate(cfg.block_out_channels):
            skips += [out] * cfg.layers_per_block
            if i < cfg.levels - 1:
                skips.append(out)
        return skips


class UNet(Encoder, nn.Module):
    """The SD/SDXL conditional UNet (see the module docstring); ``forward`` predicts noise or v."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        groups, eps, lpb = cfg.norm_groups, cfg.norm_eps, cfg.layers_per_block

        def transformer(c: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(
                c,
                cfg.heads[level],
                cfg.transformer_layers[level],
                cfg.cross_attention_dim,
                groups,
                cfg.linear_projection,
            )

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        if cfg.addition_time_embed_dim is not None:
            self.add_embedding = TimestepMLP(cfg.addition_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            ins = [ch[max(i - 1, 0)]] + [out] * (lpb - 1)
            level = Level(
                [ResnetBlock(c, out, temb, groups, eps) for c in ins],
                [transformer(out, i) for _ in range(lpb)] if cfg.attention[i] else None,
            )
            if i < cfg.levels - 1:
                level.downsamplers = nn.ModuleList([Downsample(out)])
            self.down_blocks.append(level)

        self.mid_block = MidBlock(ch[-1], temb, cfg)

        self.up_blocks = nn.ModuleList()
        skips = self._skip_channels()
        prev = ch[-1]
        for i in reversed(range(cfg.levels)):
            out = ch[i]
            resnets = []
            for j in range(lpb + 1):
                resnets.append(ResnetBlock((prev if j == 0 else out) + skips.pop(), out, temb, groups, eps))
            level = Level(
                resnets, [transformer(out, i) for _ in range(lpb + 1)] if cfg.attention[i] else None
            )
            if i > 0:
                level.upsamplers = nn.ModuleList([Upsample(out)])
            self.up_blocks.append(level)
            prev = out

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        down_block_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        mid_block_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, C, H, W) latents, ``t`` (B,) or scalar timesteps, ``context`` (B, L, D) text states;
        SDXL also takes ``pooled`` (B, P) text and ``time_ids`` (B, 6) sizes and crops. ControlNet
        residuals are added to the skips (one per skip, in push order) and to the mid output."""
        emb = self._embed(x, t, pooled, time_ids)
        h, skips = self._down(self.conv_in(x), emb, context)
        if down_block_residuals is not None:
            if len(down_block_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down-block residuals, got {len(down_block_residuals)}"
                )
            skips = [s + r for s, r in zip(skips, down_block_residuals)]

        h = self._mid(h, emb, context)
        if mid_block_residual is not None:
            h = h + mid_block_residual

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), emb)
                if hasattr(level, "attentions"):
                    h = self._run(level.attentions[j], h, context)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.conv_norm_out(h)))
