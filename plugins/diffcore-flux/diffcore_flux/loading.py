"""Building a Flux model from a job's ``model`` section: where each part's weights come from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.locate import Located, locate, part_path
from diffcore.weights import empty_weights, load_into
from diffcore_flux import convert
from diffcore_flux.config import FluxConfig, TransformerShape
from diffcore_flux.model import FluxModel
from diffcore_flux.network import FluxTransformer
from diffcore_flux.text import load_text_encoders


@attrs.frozen
class Sources:
    """Where each part comes from (None: not given)."""

    transformer: Located | None
    text_encoder: Path | None
    text_encoder_2: Path | None
    tokenizer: Path | None
    tokenizer_2: Path | None
    vae: Path | None


def resolve(config: FluxConfig) -> Sources:
    """Fill unset paths from a diffusers pipeline folder given as ``pretrained``."""
    located = None
    if config.pretrained is not None:
        located = locate(config.pretrained, "transformer", what="a Flux checkpoint")

    return Sources(
        transformer=located,
        text_encoder=part_path(config.text_encoder, located, "text_encoder"),
        text_encoder_2=part_path(config.text_encoder_2, located, "text_encoder_2"),
        tokenizer=part_path(config.tokenizer, located, "tokenizer"),
        tokenizer_2=part_path(config.tokenizer_2, located, "tokenizer_2"),
        vae=part_path(config.vae, located, "vae"),
    )


def _check_variant(shape: TransformerShape, config: FluxConfig, where: str) -> None:
    if shape.guidance_embed and config.variant != "dev":
        raise UserError(
            "this checkpoint embeds guidance (a dev-type model)", where=where, hint="set variant: dev"
        )
    if not shape.guidance_embed and config.variant == "dev":
        raise UserError(
            "this checkpoint has no guidance embedding (a schnell-type model)",
            where=where,
            hint="set variant: schnell",
        )


def check_shape(shape: TransformerShape, source: str | None = None, axes_option: str = "$.model.axes_dim") -> None:
    """Sizes that cannot build a transformer are a user error naming the option to set: a file fixes
    the head size through its tensors, but a single file does not store the RoPE split (axes_dim).
    ``source``: the file the sizes were read from (None: the model section's own sizes)."""
    dim, heads = shape.hidden_size, shape.num_heads
    if heads < 1 or dim % heads:
        raise UserError(
            f"hidden size {dim} does not split into {heads} heads",
            where=source or "$.model.num_heads",
            hint=None if source else "set hidden_size to a multiple of num_heads",
        )
    head = dim // heads
    axes = list(shape.axes_dim)
    if sum(axes) != head or any(a <= 0 or a % 2 for a in axes):
        read = f"{source} has hidden size {dim} in {heads} heads" if source else f"hidden_size {dim}, num_heads {heads}"
        raise UserError(
            f"axes_dim {axes} must be even sizes summing to the head size {head}: {read}",
            where=axes_option,
            hint=f"set axes_dim to even sizes that sum to {head}; BFL's 128-wide heads use [16, 56, 56]",
        )


def load_transformer(located: Located, config: FluxConfig, dtype: torch.dtype) -> FluxTransformer:
    """A Flux transformer from a diffusers folder, BFL's (or ComfyUI's) single file, or a single file
    with diffusers key names; streamed into a module built on the meta device."""
    where = located.where
    checkpoint = located.checkpoint()
    if located.config is not None:
        # a folder's config.json states its own axes_dims_rope, which wins over the job's axes_dim
        axes_option = (
            f"{located.path / 'config.json'}: axes_dims_rope"
            if "axes_dims_rope" in located.config
            else "$.model.axes_dim"
        )
        return _from_diffusers(checkpoint.items(), located.config, config, dtype, where, axes_option)
    keys = checkpoint.keys()
    prefix = convert.original_prefix(keys)
    if prefix + "img_in.weight" not in checkpoint:
        prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        if prefix + "x_embedder.weight" in checkpoint:
            shapes = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
            diffusers_config = convert.diffusers_config_from_keys(
                set(shapes), lambda k: tuple(checkpoint.get(shapes[k]).shape), config.axes_dim
            )
            return _from_diffusers(checkpoint.items(prefix), diffusers_config, config, dtype, where)
        raise UserError(
            "not a Flux transformer: neither BFL's keys (img_in.weight) nor diffusers' (x_embedder.weight)",
            where=where,
            hint="pass a diffusers transformer folder or BFL's flux1-*.safetensors",
        )
    own = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    shape = convert.shape_from_original(
        own, lambda k: tuple(checkpoint.get(prefix + k).shape), config.axes_dim, config.theta
    )
    check_shape(shape, where)
    _check_variant(shape, config, where)
    with empty_weights():
        backbone = FluxTransformer(shape)
    # an all-in-one ComfyUI file also holds the VAE and text encoders: only the prefix is read
    stream = convert.from_original(checkpoint.items(prefix), backbone.state_dict(), where=where)
    return load_into(backbone, stream, where=where, dtype=dtype)


def _from_diffusers(
    items,
    diffusers_config: dict[str, Any],
    config: FluxConfig,
    dtype: torch.dtype,
    where: str,
    axes_option: str = "$.model.axes_dim",
):
    shape = attrs.evolve(convert.shape_from_diffusers_config(diffusers_config), theta=config.theta)
    check_shape(shape, where, axes_option)
    _check_variant(shape, config, where)
    with empty_weights():
        backbone = FluxTransformer(shape)
    stream = convert.from_diffusers(items, backbone.state_dict(), shape.hidden_size, where=where)
    return load_into(backbone, stream, where=where, dtype=dtype)


def build_flux(config: FluxConfig) -> FluxModel:
    """The factory behind ``model: {type: flux}`` and ``diffcore.load_model("flux", ...)``."""
    dtype = torch_dtype(config.dtype, "$.model.dtype")
    frozen_dtype = torch_dtype(config.frozen_dtype or config.dtype, "$.model.frozen_dtype")
    sources = resolve(config)
    if sources.transformer is not None:
        backbone = load_transformer(sources.transformer, config, dtype)
    else:
        shape = config.shape()
        check_shape(shape)
        backbone = FluxTransformer(shape).to(dtype)
    text = None
    if config.load_encoders and any(
        p is not None
        for p in (sources.text_encoder, sources.text_encoder_2, sources.tokenizer, sources.tokenizer_2)
    ):
        text = load_text_encoders(
            sources.text_encoder,
            sources.text_encoder_2,
            sources.tokenizer,
            sources.tokenizer_2,
            max_length=config.text_length,
            dtype=frozen_dtype,
        )
    autoencoder = _autoencoder(sources.vae, config, frozen_dtype) if config.load_encoders else None
    return FluxModel(backbone, config, text=text, autoencoder=autoencoder)


def _autoencoder(path: Path | None, config: FluxConfig, dtype: torch.dtype) -> Any:
    if path is None and not config.vae_options:
        return None
    import diffcore

    options: dict[str, Any] = dict(config.vae_options)
    options.setdefault("dtype", str(dtype).removeprefix("torch."))
    return diffcore.load_autoencoder("flux", pretrained=str(path) if path is not None else None, **options)
