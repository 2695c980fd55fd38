"""Building a DiT: random init, or a checkpoint in either layout loaded onto meta-device modules."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

import diffcore
from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.locate import locate
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_dit.config import DiTArch, DiTConfig, arch_from_config, heads_for, parse_size
from diffcore_dit.convert import from_diffusers, from_original
from diffcore_dit.model import ARCH_METADATA, DiTModel
from diffcore_dit.network import DiT


def build_model(config: DiTConfig) -> DiTModel:
    """The ``dit`` factory: ``diffcore.load_model("dit", pretrained=..., **options)`` lands here."""
    dtype = torch_dtype(config.dtype, "$.model.dtype")
    autoencoder = None
    latent_channels = None
    if config.autoencoder is not None and config.load_encoders:
        # latent space: the autoencoder family comes from diffcore-vae through the kernel's registry
        autoencoder = diffcore.load_autoencoder(
            config.autoencoder, pretrained=config.autoencoder_pretrained, **config.autoencoder_options
        )
        latent_channels = autoencoder.latent_channels
    if config.pretrained is not None:
        backbone = load_backbone(config.pretrained, config, dtype)
    else:
        backbone = DiT(arch_from_config(config, in_channels=latent_channels))
        backbone.initialize_weights()
        backbone.to(dtype)
    if latent_channels is not None and backbone.arch.in_channels != latent_channels:
        raise UserError(
            f"the DiT takes {backbone.arch.in_channels} channels but the {config.autoencoder!r} "
            f"autoencoder makes {latent_channels}",
            where="$.model.in_channels",
            hint="leave in_channels unset in latent space, or pick the autoencoder the checkpoint was trained with",
        )
    model = DiTModel(backbone, prediction_type=config.prediction_type, autoencoder=autoencoder)
    model.base_model = str(config.pretrained or "")
    if config.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def load_backbone(pretrained: str, config: DiTConfig, dtype: torch.dtype) -> DiT:
    """A DiT filled from ``pretrained`` (layout detected from the keys), never randomly initialised."""
    where = str(pretrained)
    located = locate(pretrained, "transformer", what="a DiT checkpoint")
    diffusers_config = located.config
    checkpoint = located.checkpoint()
    if "pos_embed.proj.weight" in checkpoint:
        layout = "diffusers"
    elif "x_embedder.proj.weight" in checkpoint:
        layout = "original"
    else:
        raise UserError(
            "not a DiT checkpoint: it has neither diffusers' pos_embed.proj.weight nor the original "
            "x_embedder.proj.weight",
            where=where,
            hint="give a DiTTransformer2DModel folder or a facebookresearch/DiT .safetensors file",
        )
    arch = _arch_of(checkpoint, layout, diffusers_config, config, where)
    with empty_weights():
        backbone = DiT(arch)
    own = backbone.state_dict()
    if layout == "diffusers":
        stream = from_diffusers(checkpoint.items(), own, arch.depth, where=where)
    else:
        stream = from_original(checkpoint.items(), own, where=where)
    load_into(backbone, stream, where=where, dtype=dtype)
    backbone.init_buffers()
    return backbone


def _arch_of(
    checkpoint: Checkpoint,
    layout: str,
    diffusers_config: dict[str, Any] | None,
    config: DiTConfig,
    where: str,
) -> DiTArch:
    """The shapes are read from the tensors; what tensors cannot say (heads, eps, native size) comes
    from config.json, the metadata diffcore writes, or the job, in that order."""
    diffusers = layout == "diffusers"
    patch_w = checkpoint.get("pos_embed.proj.weight" if diffusers else "x_embedder.proj.weight")
    hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    block = "transformer_blocks." if diffusers else "blocks."
    depth = len({k[len(block) :].split(".", 1)[0] for k in checkpoint.keys() if k.startswith(block)})
    fc1 = "transformer_blocks.0.ff.net.0.proj.weight" if diffusers else "blocks.0.mlp.fc1.weight"
    table = (
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
        if diffusers
        else "y_embedder.embedding_table.weight"
    )
    final = "proj_out_2.weight" if diffusers else "final_layer.linear.weight"
    for key in (fc1, table, final):
        if key not in checkpoint:
            raise UserError(f"incomplete DiT checkpoint: {key} is missing", where=where)
    mlp_hidden = checkpoint.get(fc1).shape[0]
    num_classes = checkpoint.get(table).shape[0] - 1
    out_channels = checkpoint.get(final).shape[0] // (patch * patch)

    saved = json.loads(checkpoint.metadata.get(ARCH_METADATA, "{}"))
    source = diffusers_config or {}
    heads = source.get("num_attention_heads") or saved.get("num_heads") or config.num_heads
    if not heads and config.size:
        heads = parse_size(config.size)[2]
    heads = heads or heads_for(hidden)
    if not heads:
        raise UserError(
            f"the checkpoint does not say how many attention heads its width {hidden} has",
            where="$.model.num_heads",
            hint="set num_heads",
        )
    if hidden % heads or (hidden // heads) % 2:
        stated = "num_attention_heads" in source
        raise UserError(
            f"{where} is {hidden} wide, which {heads} attention heads do not split into even head sizes",
            where=f"{where}/config.json: num_attention_heads" if stated else "$.model.num_heads",
            hint=f"set num_heads to a head count that divides {hidden} into even sizes",
        )
    if "sample_size" in source:
        input_size = source["sample_size"]
    elif "pos_embed" in checkpoint:
        input_size = math.isqrt(checkpoint.get("pos_embed").shape[1]) * patch
    else:
        input_size = saved.get("input_size", config.input_size)
        if input_size % patch:  # a single file without a position table does not say its size
            raise UserError(
                f"input_size {input_size} is not divisible by the patch size {patch} of {where}",
                where="$.model.input_size",
                hint="set input_size to the (latent) image side the checkpoint was trained at",
            )
    # diffusers' config default is 1e-5; the original (and diffcore's default) 1e-6
    norm_eps = source.get("norm_eps", 1e-5) if diffusers_config else saved.get("norm_eps", config.norm_eps)

    arch = DiTArch(
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        mlp_hidden=mlp_hidden,
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
        norm_eps=norm_eps,
    )
    _check_against_job(arch, config, where)
    return arch.check(where)


def _check_against_job(arch: DiTArch, config: DiTConfig, where: str) -> None:
    """A shape the job states must agree with the checkpoint's; silence would train the wrong model."""
    stated: dict[str, tuple[Any, str]] = {}
    if config.size:
        preset = parse_size(config.size)
        stated.update(
            {n: (v, "size") for n, v in zip(("hidden_size", "depth", "num_heads", "patch_size"), preset)}
        )
    for name in ("hidden_size", "depth", "num_heads", "patch_size", "in_channels"):
        if getattr(config, name) is not None:
            stated[name] = (getattr(config, name), name)
    for name, (value, key) in stated.items():
        if getattr(arch, name) != value:
            raise UserError(
                f"the job gives {name}={value} but the checkpoint has {getattr(arch, name)}",
                where=f"$.model.{key}",
                hint=f"remove {key} from the model section, or use a checkpoint of that shape ({where})",
            )
