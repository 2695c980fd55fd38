"""Key maps between the diffusers layout and the original (SGM/LDM) single-file layout.

UNet: diffusers names (which diffcore's UNet uses) <-> ``model.diffusion_model.*`` names, per
REFERENCE.md section 1. Text encoders: HF CLIP keys stay HF under their single-file prefix, except
OpenCLIP towers (SDXL's bigG, SD2's H), which diffcore.text_encoders converts (fused ``in_proj``,
transposed ``text_projection``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch

from diffcore.keymap import KeyMap, Rule
from diffcore.text_encoders import hf_to_openclip as hf_to_openclip
from diffcore_sdxl.config import UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: where each family keeps its text encoders in a single file, and whether that tower is OpenCLIP
TEXT_PREFIXES: dict[str, dict[str, tuple[str, bool]]] = {
    "sdxl": {
        "te1": ("conditioner.embedders.0.transformer.", False),
        "te2": ("conditioner.embedders.1.model.", True),
    },
    "sd15": {"te1": ("cond_stage_model.transformer.", False)},
    "sd21": {"te1": ("cond_stage_model.model.", True)},
}

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet(module: str, file: str) -> tuple[Rule, ...]:
    return (*(Rule(f"{module}.{new}", f"{file}.{old}") for new, old in _RESNET), Rule(module, file))


#: diffusers UNet names -> original names; ``per`` = layers_per_block + 1 original blocks per level,
#: ``up_attention[b]`` = 1 when up level ``b`` has attention (its upsampler then sits third, not second)
UNET_RULES = (
    Rule("conv_in", "input_blocks.0.0"),
    Rule("time_embedding.linear_1", "time_embed.0"),
    Rule("time_embedding.linear_2", "time_embed.2"),
    Rule("add_embedding.linear_1", "label_emb.0.0"),
    Rule("add_embedding.linear_2", "label_emb.0.2"),
    Rule("conv_norm_out", "out.0"),
    Rule("conv_out", "out.2"),
    *_resnet("mid_block.resnets.0", "middle_block.0"),
    Rule("mid_block.attentions.0", "middle_block.1"),
    *_resnet("mid_block.resnets.1", "middle_block.2"),
    *_resnet("down_blocks.{b}.resnets.{j}", "input_blocks.{1 + b * per + j}.0"),
    Rule("down_blocks.{b}.attentions.{j}", "input_blocks.{1 + b * per + j}.1"),
    Rule("down_blocks.{b}.downsamplers.0.conv", "input_blocks.{b * per + per}.0.op"),
    Rule("down_blocks.{b}.downsamplers.0", "input_blocks.{b * per + per}.0"),
    *_resnet("up_blocks.{b}.resnets.{j}", "output_blocks.{b * per + j}.0"),
    Rule("up_blocks.{b}.attentions.{j}", "output_blocks.{b * per + j}.1"),
    Rule("up_blocks.{b}.upsamplers.0", "output_blocks.{b * per + per - 1}.{1 + up_attention[b]}"),
)


@functools.lru_cache(maxsize=8)
def _unet_keymap(per: int, up_attention: tuple[int, ...]) -> KeyMap:
    return KeyMap(UNET_RULES, {"per": per, "up_attention": up_attention}, name="original")


def unet_keymap(cfg: UNetConfig) -> KeyMap:
    """The UNet's original (SGM) layout, without the ``model.diffusion_model.`` prefix."""
    return _unet_keymap(cfg.layers_per_block + 1, tuple(int(a) for a in reversed(cfg.attention)))


def unet_name_to_original(name: str, cfg: UNetConfig) -> str | None:
    """A diffusers UNet parameter or module path -> its original name (no ``model.diffusion_model.``);
    None for paths that have no single original counterpart (a whole level)."""
    return unet_keymap(cfg).file_name(name)


def unet_to_original(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers-layout UNet state dict -> single-file keys (with ``model.diffusion_model.``)."""
    return {UNET_PREFIX + k: v for k, v in unet_keymap(cfg).save(state)}


def original_to_unet_names(keys: Iterable[str], cfg: UNetConfig) -> dict[str, str]:
    """original name (no prefix) -> diffusers name, for every diffusers key in ``keys``."""
    keymap = unet_keymap(cfg)
    return {keymap.file_name(k): k for k in keys}
