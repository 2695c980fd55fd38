"""Building the UNet and text encoders from a diffusers folder, an original single file, or nothing.

Modules are created on the meta device and filled tensor by tensor (diffcore.weights.load_into; the
CLIP towers through diffcore.text_encoders); a random model (``pretrained`` None) is for tests and
from-scratch experiments.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore import text_encoders
from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.text_encoders import ClipConfig, OpenClipConfig
from diffcore.text_encoders import canonical_clip_state as canonical_clip_state
from diffcore.text_encoders import load_tokenizer as load_tokenizer
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_sdxl.config import TEXT_PRESETS, UNET_PRESETS, SDConfig, UNetConfig
from diffcore_sdxl.convert import TEXT_PREFIXES, UNET_PREFIX, unet_keymap
from diffcore_sdxl.network import UNet

#: safetensors metadata key: how many HF layers an SD2 single file's OpenCLIP tower maps to
SD2_LAYERS_KEY = "diffcore.sd2_text_layers"


def _evolve(cfg: UNetConfig, overrides: dict[str, Any], where: str) -> UNetConfig:
    fields = {f.name for f in attrs.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown UNet option(s) {unknown}", where=where, hint=f"known: {sorted(fields)}")
    return attrs.evolve(cfg, **overrides)


def preset_unet(family: str, overrides: dict[str, Any]) -> UNetConfig:
    return _evolve(UNetConfig(**UNET_PRESETS[family]), overrides, "$.model.unet")


def _heads(family: str, channels: tuple[int, ...]) -> tuple[int, ...]:
    # SD1 uses 8 heads at every level; SD2 and SDXL use 64-wide heads (diffusers keeps both as
    # "attention_head_dim" in config.json, which a single file does not carry)
    if family == "sd15":
        return (8,) * len(channels)
    return tuple(max(1, c // 64) for c in channels)


def infer_unet(
    ckpt: Checkpoint, family: str, overrides: dict[str, Any], pooled_dim: int | None
) -> UNetConfig:
    """The UNet shape of an original single file, from its tensor shapes."""
    p = UNET_PREFIX
    shape = lambda key: tuple(ckpt.get(p + key).shape)  # noqa: E731
    keys = [k[len(p) :] for k in ckpt.keys() if k.startswith(p)]
    inputs = {int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")}
    levels = 1 + len({k.split(".")[1] for k in keys if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k)})
    per = (max(inputs) + 1) // levels
    channels, attention, depth = [], [], []
    for b in range(levels):
        first = 1 + b * per
        channels.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        blocks = {
            int(m.group(1))
            for k in keys
            if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))
        }
        attention.append(bool(blocks))
        depth.append(len(blocks) or 1)
    proj = next((k for k in keys if k.endswith("proj_in.weight")), None)
    to_k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise UserError(
            f"this UNet has no cross-attention layers ({p}*.attn2.to_k), so it is not an SD or SDXL UNet",
            where=str(ckpt.path),
        )
    extra: dict[str, Any] = {}
    if "label_emb.0.0.weight" in [*keys]:
        width = shape("label_emb.0.0.weight")[1]
        extra = dict(addition_input_dim=width, addition_time_embed_dim=(width - (pooled_dim or 0)) // 6)
    cfg = UNetConfig(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=channels,
        attention=attention,
        layers_per_block=per - 1,
        transformer_layers=depth,
        heads=_heads(family, tuple(channels)),
        cross_attention_dim=shape(to_k)[1],
        linear_projection=len(shape(proj)) == 2,
        **extra,
    )
    return _evolve(cfg, overrides, "$.model.unet")


def check_unet(cfg: UNetConfig, source: str | None) -> None:
    """A UNet shape that cannot be built is a user error naming the option to set. A single file
    gives the widths but not the norm groups or head counts (SD's 32 groups and the family's heads
    are assumed); ``source`` is where the shape was read (None: the model section)."""
    read = f" in {source}" if source else ""
    channels = list(cfg.block_out_channels)
    if cfg.norm_groups < 1 or any(c % cfg.norm_groups for c in channels):
        common = math.gcd(*channels) or 1
        fit = max(d for d in range(1, min(common, 32) + 1) if common % d == 0)
        raise UserError(
            f"the UNet's level widths {channels}{read} do not divide into norm_groups={cfg.norm_groups} groups",
            where="$.model.unet.norm_groups",
            hint=f"set model.unet.norm_groups to a divisor of every width, e.g. {fit}",
        )
    for level, (width, heads) in enumerate(zip(channels, cfg.heads)):
        if cfg.attention[level] and (heads < 1 or width % heads):
            raise UserError(
                f"level {level} of the UNet is {width} wide{read}, which {heads} attention heads do not divide",
                where="$.model.unet.heads",
                hint="set model.unet.heads to one head count per level, each dividing that level's width",
            )


def load_unet(cfg: UNetConfig, source: Checkpoint | None, *, original: bool, where: str) -> UNet:
    if source is None:
        return UNet(cfg)
    with empty_weights():
        unet = UNet(cfg)
    if not original:
        return load_into(unet, source.items(), where=where)
    stream = unet_keymap(cfg).load(source.items(UNET_PREFIX), unet.state_dict(), where=where)
    return load_into(unet, stream, where=where)


# -- text encoders (built by diffcore.text_encoders) ------------------------------------------------
def _text_encoder(family: str, slot: str, dtype: torch.dtype, options: dict[str, Any], **where: Any):
    """SDXL's te2 is OpenCLIP bigG with its projection, SD2's te1 OpenCLIP-H without; the others CLIP-L."""
    openclip = TEXT_PREFIXES[family][slot][1]
    name, config_class = ("openclip-bigg", OpenClipConfig) if openclip else ("clip-l", ClipConfig)
    config = config_class(projection=slot == "te2", dtype=str(dtype), options=options, **where)
    return text_encoders.load_model(name, config)


def text_preset(family: str, slot: str) -> dict[str, Any]:
    if family == "sdxl":
        return TEXT_PRESETS["clip-l" if slot == "te1" else "openclip-bigg"]
    return TEXT_PRESETS["clip-l" if family == "sd15" else "openclip-h"]


def random_text_encoder(family: str, slot: str, overrides: dict[str, Any]) -> torch.nn.Module:
    return _text_encoder(family, slot, torch.float32, {**text_preset(family, slot), **overrides})


def folder_text_encoder(
    folder: Path, slot: str, overrides: dict[str, Any], dtype: torch.dtype
) -> torch.nn.Module:
    # the folder's config.json says what the tower is; the family only picks the model class
    return _text_encoder("sdxl", slot, dtype, dict(overrides), pretrained=str(folder))


def single_file_text_encoder(
    ckpt: Checkpoint, family: str, slot: str, overrides: dict[str, Any], dtype: torch.dtype
) -> torch.nn.Module:
    prefix = TEXT_PREFIXES[family][slot][0]
    options = dict(overrides)
    if family == "sd21":
        # SD2 conditions on the penultimate layer; the HF tower omits the last one
        tower = [k[len(prefix) :] for k in ckpt.keys() if k.startswith(prefix + "transformer.resblocks.")]
        layers = len({k.split(".")[2] for k in tower})
        options = {"num_hidden_layers": int(ckpt.metadata.get(SD2_LAYERS_KEY, layers - 1)), **overrides}
    return _text_encoder(family, slot, dtype, options, pretrained=str(ckpt.path), prefix=prefix)


def dtype_of(config: SDConfig) -> torch.dtype:
    return torch_dtype(config.dtype, "$.model.dtype")
