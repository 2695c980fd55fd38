"""Building a Flux model from a job's ``model`` section: where each part's weights come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.errors import UserError
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_flux import convert
from diffcore_flux.config import FluxConfig, TransformerShape
from diffcore_flux.model import FluxModel
from diffcore_flux.text import load_text_encoders
from diffcore_flux.network import FluxTransformer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@attrs.frozen
class Sources:
    """Where each part comes from (None: not given)."""

    transformer: Path | None
    text_encoder: Path | None
    text_encoder_2: Path | None
    tokenizer: Path | None
    tokenizer_2: Path | None
    vae: Path | None


def resolve(config: FluxConfig) -> Sources:
    """Fill unset paths from a diffusers pipeline folder given as ``pretrained``."""
    pipeline: Path | None = None
    transformer: Path | None = None
    if config.pretrained is not None:
        root = Path(config.pretrained)
        if not root.exists():
            raise UserError("no such file or folder", where=str(root), hint="check model.pretrained")
        if root.is_file():
            transformer = root
        elif (root / "transformer").is_dir():
            pipeline, transformer = root, root / "transformer"
        elif (root / "config.json").exists():
            transformer = root
        else:
            raise UserError(
                "not a Flux checkpoint: expected a diffusers pipeline folder (with transformer/), a transformer "
                "folder (with config.json) or BFL's single .safetensors file",
                where=str(root),
            )

    def part(value: str | None, name: str) -> Path | None:
        if value is not None:
            return Path(value)
        if pipeline is not None and (pipeline / name).exists():
            return pipeline / name
        return None

    return Sources(
        transformer=transformer,
        text_encoder=part(config.text_encoder, "text_encoder"),
        text_encoder_2=part(config.text_encoder_2, "text_encoder_2"),
        tokenizer=part(config.tokenizer, "tokenizer"),
        tokenizer_2=part(config.tokenizer_2, "tokenizer_2"),
        vae=part(config.vae, "vae"),
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


def load_transformer(path: Path, config: FluxConfig, dtype: torch.dtype) -> FluxTransformer:
    """A Flux transformer from a diffusers folder, BFL's (or ComfyUI's) single file, or a single file
    with diffusers key names; streamed into a module built on the meta device."""
    where = str(path)
    if path.is_dir():
        diffusers_config = json.loads((path / "config.json").read_text())
        return _from_diffusers(Checkpoint(path).items(), diffusers_config, config, dtype, where)
    checkpoint = Checkpoint(path)
    rename, _ = convert.original_rename(checkpoint.keys())
    file_key = {rename(k): k for k in checkpoint.keys() if rename(k) is not None}
    if "img_in.weight" not in file_key:
        prefix = "transformer." if any(k.startswith("transformer.") for k in checkpoint.keys()) else ""
        if prefix + "x_embedder.weight" in checkpoint:
            shapes = {k[len(prefix) :]: k for k in checkpoint.keys() if k.startswith(prefix)}
            diffusers_config = convert.diffusers_config_from_keys(
                set(shapes), lambda k: tuple(checkpoint.get(shapes[k]).shape), config.axes_dim
            )
            return _from_diffusers(checkpoint.items(prefix), diffusers_config, config, dtype, where)
        raise UserError(
            "not a Flux transformer: neither BFL's keys (img_in.weight) nor diffusers' (x_embedder.weight)",
            where=where,
            hint="pass a diffusers transformer folder or BFL's flux1-*.safetensors",
        )
    shape = convert.shape_from_original(
        set(file_key), lambda k: tuple(checkpoint.get(file_key[k]).shape), config.axes_dim, config.theta
    )
    _check_variant(shape, config, where)
    with empty_weights():
        backbone = FluxTransformer(shape)
    return load_into(backbone, checkpoint.items(), where=where, dtype=dtype, rename=rename)


def _from_diffusers(
    items, diffusers_config: dict[str, Any], config: FluxConfig, dtype: torch.dtype, where: str
):
    shape = attrs.evolve(convert.shape_from_diffusers_config(diffusers_config), theta=config.theta)
    _check_variant(shape, config, where)
    with empty_weights():
        backbone = FluxTransformer(shape)
    native = list(backbone.state_dict())
    return load_into(
        backbone, convert.from_diffusers(items, native, shape.hidden_size), where=where, dtype=dtype
    )


def build_flux(config: FluxConfig) -> FluxModel:
    """The factory behind ``model: {type: flux}`` and ``diffcore.load_model("flux", ...)``."""
    dtype = _DTYPES[config.dtype]
    frozen_dtype = _DTYPES[config.frozen_dtype or config.dtype]
    sources = resolve(config)
    if sources.transformer is not None:
        backbone = load_transformer(sources.transformer, config, dtype)
    else:
        backbone = FluxTransformer(config.shape()).to(dtype)
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
