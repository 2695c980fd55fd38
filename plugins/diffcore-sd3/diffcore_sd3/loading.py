"""Building an SD3 model from a job's ``model`` section: where each part's weights come from."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.locate import Located, locate
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_sd3 import convert
from diffcore_sd3.config import SD3Config, TransformerShape
from diffcore_sd3.model import SD3Model
from diffcore_sd3.network import SD3Transformer
from diffcore_sd3.text import load_text_encoders

#: where the original single file keeps each text encoder (ComfyUI's all-in-one files)
FILE_ENCODERS = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
_TEXT_OPTIONS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@attrs.frozen
class Sources:
    """Where each part comes from (None: not given). ``prefixes``: key prefixes of the text encoders
    that live inside the single file."""

    transformer: Located | None
    parts: dict[str, Path | None]
    vae: Path | None
    prefixes: dict[str, str | None]


def resolve(config: SD3Config) -> Sources:
    """Fill unset paths from a pipeline folder, or from the single file's own text encoders and VAE."""
    located = None
    parts: dict[str, Path | None] = {name: None for name in _TEXT_OPTIONS}
    prefixes: dict[str, str | None] = {}
    vae = Path(config.vae) if config.vae is not None else None
    if config.pretrained is not None:
        located = locate(config.pretrained, "transformer", what="an SD3 checkpoint")
        if located.is_file:
            keys = Checkpoint(located.path).keys()
            for option, prefix in FILE_ENCODERS.items():
                if any(k.startswith(prefix) for k in keys):
                    parts[option], prefixes[option] = located.path, prefix
            if vae is None and any(k.startswith("first_stage_model.") for k in keys):
                vae = located.path
        else:
            for option in _TEXT_OPTIONS:
                parts[option] = located.part(option)
            if vae is None:
                vae = located.part("vae")
    for option in _TEXT_OPTIONS:
        given = getattr(config, option)
        if given is not None:
            parts[option] = Path(given)
            prefixes.pop(option, None)
    if not config.t5:
        parts["text_encoder_3"] = None
    return Sources(transformer=located, parts=parts, vae=vae, prefixes=prefixes)


def _check_variant(shape: TransformerShape, config: SD3Config, where: str) -> None:
    """A checkpoint's structure against the section's ``type``/``variant`` (sizes may be any)."""
    family = config.family
    dual = bool(shape.dual_attention_layers)
    if family == "sd3-medium":
        if shape.qk_norm or dual:
            raise UserError(
                "this is an SD3.5 checkpoint (it has q/k norms), not SD3 medium",
                where=where,
                hint="use type: sd35 with variant: medium or large",
            )
        return
    if not shape.qk_norm:
        raise UserError(
            "this is an SD3 (3.0) checkpoint without q/k norms, not SD3.5",
            where=where,
            hint="use type: sd3",
        )
    if dual and family != "medium":
        raise UserError(
            f"this is an SD3.5 medium (MMDiT-X, dual attention in blocks "
            f"{list(shape.dual_attention_layers)}) checkpoint, loaded as {family}",
            where="$.model.variant",
            hint="set variant: medium",
        )
    if not dual and family == "medium":
        raise UserError(
            "this checkpoint has no dual-attention (MMDiT-X) blocks: it is SD3.5 large or large-turbo, "
            "not medium",
            where="$.model.variant",
            hint="set variant: large (or large-turbo)",
        )


@attrs.frozen
class TransformerFile:
    """A located transformer read as far as its sizes: its shape, the tensors to stream (prefix
    removed) and their layout."""

    shape: TransformerShape
    items: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    layout: str
    where: str


def inspect_transformer(located: Located, config: SD3Config) -> TransformerFile:
    """The sizes of a diffusers folder, the original single file (with or without the
    ``model.diffusion_model.`` prefix) or a single file with diffusers key names, checked against
    the section's type and variant; no weights are read."""
    where = located.where
    checkpoint = located.checkpoint()
    if located.config is not None:
        shape = convert.shape_from_diffusers_config(located.config)
        _check_variant(shape, config, where)
        return TransformerFile(shape, checkpoint.items, "diffusers", where)
    keys = checkpoint.keys()
    prefix = convert.PREFIX if any(k.startswith(convert.PREFIX) for k in keys) else ""
    if prefix + "x_embedder.proj.weight" not in checkpoint:
        prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        if prefix + "pos_embed.proj.weight" not in checkpoint:
            raise UserError(
                "not an SD3 transformer: neither the original keys (model.diffusion_model.x_embedder.proj.weight) "
                "nor diffusers' (pos_embed.proj.weight)",
                where=where,
                hint="pass a diffusers SD3 folder or the original sd3*.safetensors single file",
            )
        shapes = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
        diffusers_config = convert.diffusers_config_from_keys(
            set(shapes), lambda k: tuple(checkpoint.get(shapes[k]).shape)
        )
        shape = convert.shape_from_diffusers_config(diffusers_config)
        layout = "diffusers"
    else:
        own = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
        shape = convert.shape_from_original(own, lambda k: tuple(checkpoint.get(prefix + k).shape))
        shape = attrs.evolve(shape, sample_size=config.sample_size)
        layout = "original"
    _check_variant(shape, config, where)
    # an all-in-one file also holds the VAE and text encoders: only the prefix is read
    return TransformerFile(shape, functools.partial(checkpoint.items, prefix), layout, where)


def load_transformer(found: TransformerFile, dtype: torch.dtype) -> SD3Transformer:
    """The transformer, streamed into a module built on the meta device."""
    with empty_weights():
        backbone = SD3Transformer(found.shape)
    own = backbone.state_dict()
    if found.layout == "diffusers":
        stream = convert.from_diffusers(found.items(), own, found.shape, where=found.where)
    else:
        stream = convert.from_original(found.items(), own, where=found.where)
    return load_into(backbone, stream, where=found.where, dtype=dtype)


def _require_text(sources: Sources, config: SD3Config) -> None:
    """Say which encoder is missing before anything loads."""
    located = sources.transformer
    from_file = located is not None and located.is_file
    for option, what in (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G")):
        if sources.parts[option] is None:
            holder = "this single file holds no text encoders" if from_file else "no text encoders found"
            raise UserError(
                f"{holder} ({what} missing) and {option} is not set",
                where=f"$.model.{option}",
                hint="set text_encoder (clip_l.safetensors), text_encoder_2 (clip_g.safetensors) and "
                "text_encoder_3 (t5xxl) with tokenizer, tokenizer_2, tokenizer_3 folders; "
                "or load_encoders: false to load the transformer alone",
            )
    if config.t5 and sources.parts["text_encoder_3"] is None:
        raise UserError(
            "no T5 text encoder found and text_encoder_3 is not set",
            where="$.model.text_encoder_3",
            hint="set text_encoder_3 to T5-XXL (t5xxl_*.safetensors), or t5: false to condition on zeros "
            "in its place",
        )


def build_sd3(config: SD3Config) -> SD3Model:
    """The factory behind ``model: {type: sd3 | sd35}`` and ``diffcore.load_model``."""
    dtype = torch_dtype(config.dtype, "$.model.dtype")
    frozen_dtype = torch_dtype(config.frozen_dtype or config.dtype, "$.model.frozen_dtype")
    sources = resolve(config)
    # everything a user can get wrong is checked before any weights are read
    found = inspect_transformer(sources.transformer, config) if sources.transformer is not None else None
    if config.load_encoders and found is not None:
        _require_text(sources, config)
    if found is not None:
        backbone = load_transformer(found, dtype)
    else:
        backbone = SD3Transformer(config.shape()).to(dtype)
    text = None
    if config.load_encoders and sources.parts["text_encoder"] is not None:
        text = load_text_encoders(
            sources.parts,
            context_dim=backbone.shape.context_dim,
            t5_length=config.max_sequence_length,
            clip_length=config.clip_max_length,
            dtype=frozen_dtype,
            prefix=sources.prefixes,
        )
    autoencoder = _autoencoder(sources.vae, config, frozen_dtype) if config.load_encoders else None
    return SD3Model(backbone, config, text=text, autoencoder=autoencoder)


def _autoencoder(path: Path | None, config: SD3Config, dtype: torch.dtype) -> Any:
    if path is None and not config.vae_options:
        return None
    import diffcore

    options: dict[str, Any] = dict(config.vae_options)
    options.setdefault("dtype", str(dtype).removeprefix("torch."))
    return diffcore.load_autoencoder("sd3", pretrained=str(path) if path is not None else None, **options)
