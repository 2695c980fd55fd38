"""Reading and writing autoencoder checkpoints in the diffusers and the original layouts.

Accepted ``pretrained`` values: a diffusers ``vae/`` folder (``config.json`` + weights), a pipeline
folder (its ``vae/``), a standalone VAE ``.safetensors`` in either layout, a full SD/SDXL/SD3 single
file (``first_stage_model.`` keys), or BFL's ``ae.safetensors`` (Flux.1, Flux.2). The architecture is
read from ``config.json`` when there is one, else from tensor shapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.locate import locate as locate_component
from diffcore.weights import Checkpoint, save_safetensors
from diffcore_vae import convert
from diffcore_vae.config import AutoencoderConfig, Flux2Config

_PREFIXES = ("first_stage_model.", "vae.", "")
_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "scaling_factor",
    "shift_factor",
    "force_upcast",
    "decoder_block_out_channels",
    "batch_norm_eps",
    "batch_norm_momentum",
    "patch_size",
)
_CLASS = {False: "AutoencoderKL", True: "AutoencoderKLFlux2"}


@attrs.frozen
class Source:
    """A located checkpoint: its tensors, the key prefix, the layout and the config.json if any."""

    where: str
    checkpoint: Checkpoint
    prefix: str
    layout: str  # "diffusers" or "original"
    config_json: dict[str, Any] | None


def locate(path: str) -> Source:
    """Find the autoencoder weights under ``path`` and which layout they are in."""
    located = locate_component(path, "vae", what="an autoencoder")
    p = located.path
    ckpt = located.checkpoint()
    keys = ckpt.keys()
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in keys) and any(
            k.startswith(prefix + "decoder.") for k in keys
        ):
            break
    else:
        raise UserError(
            "no autoencoder weights here (no encoder.* / decoder.* or first_stage_model.encoder.* keys)",
            where=str(p),
            hint="pass a diffusers vae/ folder, a VAE .safetensors, or a full SD/SDXL/SD3 or BFL ae file",
        )
    layout = "diffusers" if any(k.startswith(prefix + "encoder.down_blocks.") for k in keys) else "original"
    return Source(str(p), ckpt, prefix, layout, located.config)


def architecture(source: Source, config: AutoencoderConfig) -> AutoencoderConfig:
    """``config`` with its architecture keys replaced by what the checkpoint says."""
    flux2 = isinstance(config, Flux2Config)
    has_bn = f"{source.prefix}bn.running_mean" in source.checkpoint
    if has_bn != flux2:
        found = "Flux.2's batch-norm statistics" if has_bn else "no Flux.2 batch-norm statistics"
        raise UserError(
            f"this autoencoder has {found}, so it is not a {config.family!r} autoencoder",
            where=source.where,
            hint="use family 'flux2'" if has_bn else "use family 'sd', 'sdxl', 'sd3' or 'flux'",
        )
    if source.config_json is not None:
        found = _from_config_json(source, flux2)
    else:
        found = _from_shapes(source, flux2)
    latent = found.setdefault("latent_channels", config.latent_channels)
    if latent != config.latent_channels:
        raise UserError(
            f"this autoencoder has {latent} latent channels; family {config.family!r} "
            f"expects {config.latent_channels}",
            where=source.where,
            hint="4 channels: 'sd' or 'sdxl'; 16: 'sd3' or 'flux'; 32: 'flux2' (or set latent_channels)",
        )
    fields = attrs.fields_dict(type(config))
    return attrs.evolve(config, **{k: v for k, v in found.items() if k in fields})


def _from_config_json(source: Source, flux2: bool) -> dict[str, Any]:
    cfg = source.config_json or {}
    where = str(Path(source.where) / "config.json")
    cls = cfg.get("_class_name")
    if cls is not None and cls != _CLASS[flux2]:
        raise UserError(f"config.json describes a {cls}, not an {_CLASS[flux2]}", where=where)
    if cfg.get("act_fn", "silu") != "silu":
        raise UserError(f"act_fn {cfg['act_fn']!r} is not supported (only 'silu')", where=where)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != kind for t in cfg.get(key, [])):
            raise UserError(f"{key} other than {kind} are not supported", where=where)
    found = {k: cfg[k] for k in _ARCH_KEYS if k in cfg}
    for key in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
        if found.get(key) is not None:
            found[key] = list(found[key])
    return found


def _from_shapes(source: Source, flux2: bool) -> dict[str, Any]:
    ckpt, pre = source.checkpoint, source.prefix

    def shape(key: str) -> tuple[int, ...]:
        return tuple(ckpt.get(pre + key).shape)

    def has(key: str) -> bool:
        return pre + key in ckpt

    if source.layout == "diffusers":
        enc = "encoder.down_blocks.{}.resnets.{}.norm2.weight"
        dec = "decoder.up_blocks.{}.resnets.0.norm2.weight"
        attn = "encoder.mid_block.attentions.0.to_q.weight"
        quant, post = "quant_conv.weight", "post_quant_conv.weight"
    else:
        enc = "encoder.down.{}.block.{}.norm2.weight"
        dec = "decoder.up.{}.block.0.norm2.weight"
        attn = "encoder.mid.attn_1.q.weight"
        quant = "encoder.quant_conv.weight" if flux2 else "quant_conv.weight"
        post = "decoder.post_quant_conv.weight" if flux2 else "post_quant_conv.weight"
    levels = 0
    while has(enc.format(levels, 0)):
        levels += 1
    layers = 0
    while has(enc.format(0, layers)):
        layers += 1
    if levels == 0 or not has("encoder.conv_out.bias"):
        raise UserError("the encoder's blocks are missing from this file", where=source.where)
    channels = [shape(enc.format(i, 0))[0] for i in range(levels)]
    if source.layout == "diffusers":
        decoder = [shape(dec.format(levels - 1 - i))[0] for i in range(levels)]
    else:
        decoder = [shape(dec.format(i))[0] for i in range(levels)]
    found: dict[str, Any] = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.bias")[0],
        "latent_channels": shape("encoder.conv_out.bias")[0] // 2,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "use_quant_conv": has(quant),
        "use_post_quant_conv": has(post),
        "mid_block_add_attention": has(attn),
    }
    if decoder != channels:
        if not flux2:
            raise UserError(
                "decoder and encoder widths differ; only Flux.2 autoencoders allow that", where=source.where
            )
        found["decoder_block_out_channels"] = decoder
    if flux2:
        found["patch_size"] = _patch_size(shape("bn.running_mean")[0], found["latent_channels"], source.where)
    return found


def _patch_size(channels: int, latent: int, where: str) -> list[int]:
    side = round((channels // latent) ** 0.5)
    if side * side * latent != channels:
        raise UserError(
            f"batch-norm over {channels} channels does not fit {latent} latent channels", where=where
        )
    return [side, side]


def tensors(
    source: Source, module: nn.Module, levels: int, flux2: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under the module's (diffusers) names, streamed one at a time."""
    own = list(module.state_dict())
    keymap = convert.original(levels, flux2) if source.layout == "original" else convert.diffusers()
    seen_batches = False
    for name, value in keymap.load(source.checkpoint.items(source.prefix), own, where=source.where):
        seen_batches |= name == "bn.num_batches_tracked"
        yield name, value
    # Some exports drop BatchNorm's step counter; it never affects inference.
    if flux2 and not seen_batches and "bn.num_batches_tracked" in own:
        yield "bn.num_batches_tracked", torch.tensor(0, dtype=torch.long)


def save(module: nn.Module, config: AutoencoderConfig, path: str | Path, layout: str) -> Path:
    """Write the module's weights in ``layout``: a diffusers folder or an original single file."""
    flux2 = isinstance(config, Flux2Config)
    state = module.state_dict()
    path = Path(path)
    if layout == "diffusers":
        if path.suffix == ".safetensors":
            raise UserError("the diffusers layout is a folder", where=str(path), hint="pass a folder path")
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
        return path
    if layout == "original":
        if path.suffix != ".safetensors":
            raise UserError(
                "the original layout is one file", where=str(path), hint="pass a path ending in .safetensors"
            )
        keymap = convert.original(len(config.block_out_channels), flux2)
        save_safetensors(dict(keymap.save(state, where=str(path))), path)
        return path
    raise UserError(f"unknown layout {layout!r}", where="layout", hint="use 'diffusers' or 'original'")


def diffusers_config(config: AutoencoderConfig) -> dict[str, Any]:
    """The ``config.json`` diffusers writes for this autoencoder."""
    flux2 = isinstance(config, Flux2Config)
    n = len(config.block_out_channels)
    out: dict[str, Any] = {
        "_class_name": _CLASS[flux2],
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.tile_size,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
    }
    if flux2:
        out.update(
            decoder_block_out_channels=config.decoder_block_out_channels,
            batch_norm_eps=config.batch_norm_eps,
            batch_norm_momentum=config.batch_norm_momentum,
            patch_size=list(config.patch_size),
        )
    else:
        out.update(
            scaling_factor=config.scaling_factor,
            shift_factor=config.shift_factor,
            force_upcast=config.force_upcast,
        )
    return out
