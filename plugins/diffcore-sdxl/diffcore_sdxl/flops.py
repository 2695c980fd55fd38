"""The SD/SDXL UNet's forward FLOPs for one sample, counted from its layers (see :mod:`diffcore.flops`).

The walk follows :meth:`diffcore_sdxl.network.UNet.forward`: every convolution at the resolution it
runs at (a stride-2 downsampler halves it, rounding up; an upsampler returns to the skip's size), and
every spatial transformer's projections and attention over that level's tokens, its cross-attention
keys and values over the text tokens.
"""

from __future__ import annotations

from diffcore.flops import attention_flops, conv_flops, conv_output_size, linear_flops
from diffcore_sdxl.network import Attention, ResnetBlock, SpatialTransformer, UNet

#: text tokens a caption encodes to: one CLIP window (longer prompts add windows of 77)
TEXT_TOKENS = 77


def forward_flops(net: UNet, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> int:
    """Matmul and convolution FLOPs of ``net`` on one latent of ``height`` x ``width``."""
    total = conv_flops(net.conv_in, height, width) + linear_flops(net.time_embedding)
    if net.config.addition_time_embed_dim is not None:
        total += linear_flops(net.add_embedding)
    size = (height, width)
    sizes = []  # each down level's resolution, for the up path's upsamplers
    for level in net.down_blocks:
        sizes.append(size)
        total += _level(level, size, text_tokens)
        if hasattr(level, "downsamplers"):
            conv = level.downsamplers[0].conv
            total += conv_flops(conv, *size)
            size = conv_output_size(conv, *size)
    total += _level(net.mid_block, size, text_tokens)
    for j, level in enumerate(net.up_blocks):  # coarsest first: up level j runs where down level -1-j did
        total += _level(level, sizes[-1 - j], text_tokens)
        if hasattr(level, "upsamplers"):
            total += conv_flops(level.upsamplers[0].conv, *sizes[-2 - j])
    return total + conv_flops(net.conv_out, height, width)


def _level(level, size: tuple[int, int], text_tokens: int) -> int:
    total = sum(_resnet(r, size) for r in level.resnets)
    for transformer in getattr(level, "attentions", ()):
        total += _transformer(transformer, size, text_tokens)
    return total


def _resnet(block: ResnetBlock, size: tuple[int, int]) -> int:
    total = conv_flops(block.conv1, *size) + conv_flops(block.conv2, *size) + linear_flops(block.time_emb_proj)
    if block.conv_shortcut is not None:
        total += conv_flops(block.conv_shortcut, *size)
    return total


def _transformer(transformer: SpatialTransformer, size: tuple[int, int], text_tokens: int) -> int:
    tokens = size[0] * size[1]
    total = 0
    for proj in (transformer.proj_in, transformer.proj_out):
        total += tokens * linear_flops(proj) if transformer.linear else conv_flops(proj, *size)
    for block in transformer.transformer_blocks:
        total += _attention(block.attn1, tokens, tokens) + _attention(block.attn2, tokens, text_tokens)
        total += tokens * linear_flops(block.ff)
    return total


def _attention(attn: Attention, queries: int, keys: int) -> int:
    """Projections (queries and output over the image tokens, keys and values over ``keys``) and
    the attention itself."""
    dim = attn.to_q.out_features
    projections = queries * linear_flops(attn.to_q, attn.to_out) + keys * linear_flops(attn.to_k, attn.to_v)
    return projections + attention_flops(queries, keys, dim)
