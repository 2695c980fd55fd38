"""Key maps between diffcore's Flux modules, BFL's original files and diffusers' FluxTransformer2DModel,
as :mod:`diffcore.keymap` rules.

diffcore's module paths are BFL's, so the original layout differs only in the QK-norm gain name
(``scale`` there, ``weight`` here) and an optional ``model.diffusion_model.`` prefix (ComfyUI files).
diffusers splits BFL's fused projections: ``img_attn.qkv`` into ``to_q/k/v`` and a single block's
``linear1`` into ``to_q/k/v`` + ``proj_mlp``; the final modulation's halves are swapped
(BFL shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from diffcore.keymap import KeyMap, Rule, Split, SwapHalves
from diffcore_flux.config import TransformerShape

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

ORIGINAL_RULES = (
    Rule("*.query_norm.weight", "*.query_norm.scale"),
    Rule("*.key_norm.weight", "*.key_norm.scale"),
    Rule("*", "*"),
)
ORIGINAL = KeyMap(ORIGINAL_RULES, name="original")

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."
_QKV = Split(("dim", "dim", "dim"))
DIFFUSERS_RULES = (
    Rule("img_in", "x_embedder"),
    Rule("txt_in", "context_embedder"),
    *(
        Rule(f"{bfl}.{side}_layer", f"time_text_embed.{name}_embedder.linear_{n}")
        for bfl, name in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance"))
        for side, n in (("in", 1), ("out", 2))
    ),
    Rule("final_layer.linear", "proj_out"),
    Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SwapHalves()),
    Rule("double_blocks.{i}.img_mod.lin", _D + "norm1.linear"),
    Rule("double_blocks.{i}.txt_mod.lin", _D + "norm1_context.linear"),
    Rule("double_blocks.{i}.img_attn.qkv", tuple(_D + f"attn.to_{x}" for x in "qkv"), _QKV),
    Rule("double_blocks.{i}.txt_attn.qkv", tuple(_D + f"attn.add_{x}_proj" for x in "qkv"), _QKV),
    Rule("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
    Rule("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
    Rule("double_blocks.{i}.img_attn.norm.query_norm", _D + "attn.norm_q"),
    Rule("double_blocks.{i}.img_attn.norm.key_norm", _D + "attn.norm_k"),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm", _D + "attn.norm_added_q"),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm", _D + "attn.norm_added_k"),
    Rule("double_blocks.{i}.img_mlp.0", _D + "ff.net.0.proj"),
    Rule("double_blocks.{i}.img_mlp.2", _D + "ff.net.2"),
    Rule("double_blocks.{i}.txt_mlp.0", _D + "ff_context.net.0.proj"),
    Rule("double_blocks.{i}.txt_mlp.2", _D + "ff_context.net.2"),
    Rule(
        "single_blocks.{i}.linear1",
        tuple(_S + x for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
        Split(("dim", "dim", "dim", None)),  # the MLP takes the remaining rows
    ),
    Rule("single_blocks.{i}.linear2", _S + "proj_out"),
    Rule("single_blocks.{i}.modulation.lin", _S + "norm.linear"),
    Rule("single_blocks.{i}.norm.query_norm", _S + "attn.norm_q"),
    Rule("single_blocks.{i}.norm.key_norm", _S + "attn.norm_k"),
)


def diffusers(dim: int) -> KeyMap:
    return KeyMap.of(DIFFUSERS_RULES, {"dim": dim}, name="diffusers")


def diffusers_modules(path: str, dim: int) -> tuple[list[tuple[str, int | None]], str] | None:
    """The diffusers module(s) holding native module ``path``, each with its row count in a fused
    weight (None when not fused, or for linear1's MLP remainder), and the split kind ("", "qkv",
    "linear1"); None if unmapped."""
    keymap = diffusers(dim)
    names = keymap.file_names(path)
    if names is None:
        return None
    rows = keymap.rows(path)
    if rows is None:
        return [(names[0], None)], ""
    return list(zip(names, rows, strict=True)), "qkv" if len(names) == 3 else "linear1"


def to_diffusers(state: Iterable[tuple[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """Native (diffcore) tensors -> diffusers FluxTransformer2DModel keys."""
    return dict(diffusers(dim).save(state))


def to_original(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native tensors -> BFL's original single-file keys."""
    return dict(ORIGINAL.save(state))


def original_prefix(keys: Iterable[str]) -> str:
    """The ComfyUI prefix of an original file's transformer keys ("" for BFL's own files)."""
    keys = list(keys)
    return next((p for p in ORIGINAL_PREFIXES if any(k.startswith(p) for k in keys)), "")


def from_original(
    items: Iterable[tuple[str, torch.Tensor]], native_keys: Iterable[str], *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an original file's tensors (prefix removed) as native ones."""
    return ORIGINAL.load(items, native_keys, where=where)


def from_diffusers(
    items: Iterable[tuple[str, torch.Tensor]],
    native_keys: Iterable[str],
    dim: int,
    *,
    where: str = "diffusers weights",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream diffusers tensors as native ones, fusing split projections once all their parts arrived.
    A key no rule claims is a UserError; a fused weight with parts missing is never yielded, so the
    loader reports it as missing."""
    return diffusers(dim).load(items, native_keys, where=where)


def shape_from_diffusers_config(
    config: dict[str, Any], axes_dim: Iterable[int] | None = None
) -> TransformerShape:
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    return TransformerShape(
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", axes_dim or (16, 56, 56))),
        in_channels=config.get("in_channels", 64),
        vec_in_dim=config.get("pooled_projection_dim", 768),
        context_in_dim=config.get("joint_attention_dim", 4096),
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def diffusers_config_from_keys(
    keys: set[str], shape_of: Callable[[str], tuple[int, ...]], axes_dim: Iterable[int]
) -> dict[str, Any]:
    """The FluxTransformer2DModel config of a diffusers-keyed single file, read from its shapes."""

    def count(prefix: str) -> int:
        found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
        return max(found) + 1 if found else 0

    hidden, in_channels = shape_of("x_embedder.weight")
    head_dim = shape_of("transformer_blocks.0.attn.norm_q.weight")[0]
    return {
        "in_channels": in_channels,
        "num_layers": count("transformer_blocks."),
        "num_single_layers": count("single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape_of("context_embedder.weight")[1],
        "pooled_projection_dim": shape_of("time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in keys,
        "axes_dims_rope": list(axes_dim),
    }


def diffusers_config(shape: TransformerShape) -> dict[str, Any]:
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0",
        "patch_size": 1,
        "in_channels": shape.in_channels,
        "out_channels": None,
        "num_layers": shape.depth,
        "num_single_layers": shape.depth_single,
        "attention_head_dim": shape.hidden_size // shape.num_heads,
        "num_attention_heads": shape.num_heads,
        "joint_attention_dim": shape.context_in_dim,
        "pooled_projection_dim": shape.vec_in_dim,
        "guidance_embeds": shape.guidance_embed,
        "axes_dims_rope": list(shape.axes_dim),
    }


def shape_from_original(
    keys: set[str], shape_of: Callable[[str], tuple[int, ...]], axes_dim: Iterable[int], theta: float
) -> TransformerShape:
    """Sizes of a BFL file from its keys (prefix removed) and a few small tensors' shapes."""

    def count(prefix: str) -> int:
        found = {int(k.split(".")[1]) for k in keys if k.startswith(prefix)}
        return max(found) + 1 if found else 0

    hidden, in_channels = shape_of("img_in.weight")
    head_dim = shape_of("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    mlp_hidden = shape_of("double_blocks.0.img_mlp.0.bias")[0]
    return TransformerShape(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count("double_blocks."),
        depth_single=count("single_blocks."),
        axes_dim=tuple(axes_dim),
        theta=theta,
        in_channels=in_channels,
        vec_in_dim=shape_of("vector_in.in_layer.weight")[1],
        context_in_dim=shape_of("txt_in.weight")[1],
        mlp_ratio=mlp_hidden / hidden,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in keys,
        guidance_embed="guidance_in.in_layer.weight" in keys,
    )
