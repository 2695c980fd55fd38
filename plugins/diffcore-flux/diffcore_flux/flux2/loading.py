"""Building a Flux.2 model from a job's ``model`` section: where each part's weights come from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.locate import Located, locate, part_path
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_flux.flux2 import convert
from diffcore_flux.flux2.config import VARIANTS, Flux2Config, Flux2Shape
from diffcore_flux.flux2.model import Flux2Model
from diffcore_flux.flux2.network import Flux2Transformer
from diffcore_flux.flux2.text import Flux2Text, load_text

#: keys only a Flux.1 checkpoint holds (BFL and diffusers names)
FLUX1_KEYS = ("vector_in.in_layer.weight", "double_blocks.0.img_mod.lin.weight", "time_text_embed.text_embedder.linear_1.weight")


@attrs.frozen
class Sources:
    transformer: Located | None
    text_encoder: Path | None
    tokenizer: Path | None
    vae: Path | None


def resolve(config: Flux2Config) -> Sources:
    """Fill unset paths from a diffusers pipeline folder given as ``pretrained``."""
    located = None
    if config.pretrained is not None:
        located = locate(config.pretrained, "transformer", what="a Flux.2 checkpoint")

    return Sources(
        transformer=located,
        text_encoder=part_path(config.text_encoder, located, "text_encoder"),
        tokenizer=part_path(config.tokenizer, located, "tokenizer"),
        vae=part_path(config.vae, located, "vae"),
    )


def _check_variant(shape: Flux2Shape, config: Flux2Config, where: str) -> None:
    if shape.guidance_embed != config.is_dev:
        found = "embeds guidance (a dev model)" if shape.guidance_embed else "has no guidance embedding (a klein model)"
        raise UserError(
            f"this checkpoint {found} but variant is {config.variant!r}",
            where=where,
            hint="set variant: dev" if shape.guidance_embed else "set variant: klein-4b or klein-9b",
        )


def _not_flux1(checkpoint: Checkpoint, prefix: str, where: str) -> None:
    if any(prefix + k in checkpoint for k in FLUX1_KEYS):
        raise UserError(
            "this is a Flux.1 checkpoint (it has per-block modulation and a pooled-text input), not Flux.2",
            where=where,
            hint="use model type 'flux' for Flux.1 checkpoints",
        )


def load_transformer(located: Located, config: Flux2Config, dtype: torch.dtype) -> Flux2Transformer:
    """A Flux.2 transformer from a diffusers folder, BFL's (or ComfyUI's) single file, or a single file
    with diffusers key names; streamed into a module built on the meta device."""
    where = located.where
    checkpoint = located.checkpoint()
    if located.config is not None:
        if located.config.get("_class_name", "Flux2Transformer2DModel") != "Flux2Transformer2DModel":
            raise UserError(
                f"config.json describes a {located.config.get('_class_name')}, not a Flux2Transformer2DModel",
                where=where,
                hint="use model type 'flux' for Flux.1 checkpoints",
            )
        shape = convert.shape_from_diffusers_config(located.config)
        return _fill(shape, checkpoint.items(), config, dtype, where, "diffusers")
    keys = checkpoint.keys()
    prefix = next((p for p in convert.ORIGINAL_PREFIXES if any(k.startswith(p) for k in keys)), "")
    _not_flux1(checkpoint, prefix, where)
    if prefix + "img_in.weight" in checkpoint:
        layout = "original"
    else:
        prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        _not_flux1(checkpoint, prefix, where)
        if prefix + "x_embedder.weight" not in checkpoint:
            raise UserError(
                "not a Flux.2 transformer: neither BFL's keys (img_in.weight) nor diffusers' (x_embedder.weight)",
                where=where,
                hint="pass a diffusers transformer folder or BFL's flux2-*.safetensors",
            )
        layout = "diffusers"
    own = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    axes = config.shape.get("axes_dim")
    shape = convert.shape_from_keys(
        own, lambda k: tuple(checkpoint.get(prefix + k).shape), layout=layout, axes_dim=axes,
        theta=float(config.shape.get("theta", 2000.0)),
    )  # fmt: skip
    # an all-in-one ComfyUI file also holds the VAE and text encoder: only the prefix is read
    return _fill(shape, checkpoint.items(prefix), config, dtype, where, layout)


def _fill(shape: Flux2Shape, items, config: Flux2Config, dtype: torch.dtype, where: str, layout: str):
    _check_variant(shape, config, where)
    with empty_weights():
        backbone = Flux2Transformer(shape)
    native = backbone.state_dict()
    if layout == "diffusers":
        stream = convert.from_diffusers(items, native, where=where)
    else:
        stream = convert.from_original(items, native, where=where)
    return load_into(backbone, stream, where=where, dtype=dtype)


def build_flux2(config: Flux2Config) -> Flux2Model:
    """The factory behind ``model: {type: flux2}`` and ``diffcore.load_model("flux2", ...)``."""
    if config.variant not in VARIANTS:
        raise UserError(f"unknown variant {config.variant!r}", where="$.model.variant", hint="dev, klein-4b or klein-9b")
    dtype = torch_dtype(config.dtype, "$.model.dtype")
    frozen_dtype = torch_dtype(config.frozen_dtype or config.dtype, "$.model.frozen_dtype")
    sources = resolve(config)
    if sources.transformer is not None:
        backbone = load_transformer(sources.transformer, config, dtype)
    else:
        backbone = Flux2Transformer(config.random_shape()).to(dtype)
    text = None
    if config.load_encoders and (sources.text_encoder is not None or sources.tokenizer is not None):
        text = _text(sources, config, frozen_dtype)
        if text.width != backbone.shape.context_in_dim:
            raise UserError(
                f"the text encoder gives {text.width} features per token ({len(text.encoder.config.layers)} "
                f"layers x {text.width // len(text.encoder.config.layers)}) but the transformer takes "
                f"{backbone.shape.context_in_dim}",
                where="$.model.text_encoder",
                hint="use the text encoder of this variant (klein-4b: Qwen3-4B, klein-9b: Qwen3-8B, dev: Mistral-Small-3)",
            )
    autoencoder = _autoencoder(sources.vae, config, frozen_dtype) if config.load_encoders else None
    return Flux2Model(backbone, config, text=text, autoencoder=autoencoder)


def _text(sources: Sources, config: Flux2Config, dtype: torch.dtype) -> Flux2Text:
    path, subfolder = sources.text_encoder, None
    tokenizer = sources.tokenizer
    return load_text(
        path,
        tokenizer,
        dev=config.is_dev,
        layers=config.text_layers,
        max_length=config.max_sequence_length,
        dtype=dtype,
        options=config.text_encoder_options,
        subfolder=subfolder,
    )


def _autoencoder(path: Path | None, config: Flux2Config, dtype: torch.dtype) -> Any:
    if path is None and not config.vae_options:
        return None
    import diffcore

    options: dict[str, Any] = dict(config.vae_options)
    options.setdefault("dtype", str(dtype).removeprefix("torch."))
    return diffcore.load_autoencoder("flux2", pretrained=str(path) if path is not None else None, **options)
