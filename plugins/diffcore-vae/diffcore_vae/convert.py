"""Key names of the original single-file layouts (LDM/SGM ``first_stage_model.``, BFL ``ae``) versus
the diffusers layout that :class:`~diffcore_vae.network.KLAutoencoderNet` uses.

One direction is written out (diffusers -> original); loading inverts it over the module's own keys,
so the two directions cannot drift apart. The mid-block attention projections are 1x1 convolutions in
the original files and linear layers in diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_LINEAR = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
#: keys some original VAE files carry besides the autoencoder (training losses, EMA copies)
JUNK_PREFIXES = ("loss.", "model_ema.")


def to_original(key: str, levels: int, flux2: bool = False) -> str:
    """The original-layout name of diffusers key ``key`` (``levels`` = len(block_out_channels))."""
    if flux2 and key.startswith("quant_conv."):
        return "encoder." + key
    if flux2 and key.startswith("post_quant_conv."):
        return "decoder." + key
    m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3])}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3])}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3])}"
    m = re.match(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key
    )
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"
    return key


def _resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def original_names(diffusers_keys: Iterable[str], levels: int, flux2: bool = False) -> dict[str, str]:
    """{original key: diffusers key} for the keys of a module in the diffusers layout."""
    return {to_original(k, levels, flux2): k for k in diffusers_keys}


def is_attention_linear(diffusers_key: str) -> bool:
    return _ATTN_LINEAR.search(diffusers_key) is not None


def as_linear(tensor: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) or conv1d (out, in, 1) as a linear weight (out, in)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim > 2 else tensor


def as_conv(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
