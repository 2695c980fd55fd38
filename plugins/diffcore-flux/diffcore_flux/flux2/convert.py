"""Key maps between diffcore's Flux.2 modules, BFL's original files and diffusers'
Flux2Transformer2DModel, as :mod:`diffcore.keymap` rules.

diffcore's module paths are BFL's, so the original layout differs only in the QK-norm gain name
(``scale`` there) and an optional ComfyUI prefix. diffusers splits only the double blocks' fused
``qkv``; a single block's ``linear1`` stays fused (``attn.to_qkv_mlp_proj``); the final modulation's
halves are swapped (BFL shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from diffcore.keymap import KeyMap, Rule, Split, SwapHalves
from diffcore_flux.convert import ORIGINAL, ORIGINAL_PREFIXES
from diffcore_flux.flux2.config import Flux2Shape

__all__ = ["ORIGINAL", "ORIGINAL_PREFIXES"]

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."
DIFFUSERS_RULES = (
    Rule("img_in", "x_embedder"),
    Rule("txt_in", "context_embedder"),
    *(
        Rule(f"{bfl}.{side}_layer", f"time_guidance_embed.{name}_embedder.linear_{n}")
        for bfl, name in (("time_in", "timestep"), ("guidance_in", "guidance"))
        for side, n in (("in", 1), ("out", 2))
    ),
    *(
        Rule(f"{name}.lin", f"{name}.linear")
        for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
    ),
    Rule("final_layer.linear", "proj_out"),
    Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SwapHalves()),
    Rule("double_blocks.{i}.img_attn.qkv", tuple(_D + f"attn.to_{x}" for x in "qkv"), Split()),
    Rule("double_blocks.{i}.txt_attn.qkv", tuple(_D + f"attn.add_{x}_proj" for x in "qkv"), Split()),
    Rule("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
    Rule("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
    Rule("double_blocks.{i}.img_attn.norm.query_norm", _D + "attn.norm_q"),
    Rule("double_blocks.{i}.img_attn.norm.key_norm", _D + "attn.norm_k"),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm", _D + "attn.norm_added_q"),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm", _D + "attn.norm_added_k"),
    Rule("double_blocks.{i}.img_mlp.0", _D + "ff.linear_in"),
    Rule("double_blocks.{i}.img_mlp.2", _D + "ff.linear_out"),
    Rule("double_blocks.{i}.txt_mlp.0", _D + "ff_context.linear_in"),
    Rule("double_blocks.{i}.txt_mlp.2", _D + "ff_context.linear_out"),
    Rule("single_blocks.{i}.linear1", _S + "attn.to_qkv_mlp_proj"),
    Rule("single_blocks.{i}.linear2", _S + "attn.to_out"),
    Rule("single_blocks.{i}.norm.query_norm", _S + "attn.norm_q"),
    Rule("single_blocks.{i}.norm.key_norm", _S + "attn.norm_k"),
)
DIFFUSERS = KeyMap(DIFFUSERS_RULES, name="diffusers")


def diffusers_modules(path: str) -> tuple[list[str], bool] | None:
    """The diffusers module(s) holding native module ``path`` and whether they split it in equal
    thirds (a double block's qkv); None if unmapped."""
    names = DIFFUSERS.file_names(path)
    if names is None:
        return None
    return list(names), len(names) == 3


def to_diffusers(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native (diffcore) tensors -> diffusers Flux2Transformer2DModel keys."""
    return dict(DIFFUSERS.save(state))


def to_original(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native tensors -> BFL's original single-file keys."""
    return dict(ORIGINAL.save(state))


def from_original(
    items: Iterable[tuple[str, torch.Tensor]], native_keys: Iterable[str], *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    return ORIGINAL.load(items, native_keys, where=where)


def from_diffusers(
    items: Iterable[tuple[str, torch.Tensor]], native_keys: Iterable[str], *, where: str = "diffusers weights"
) -> Iterator[tuple[str, torch.Tensor]]:
    return DIFFUSERS.load(items, native_keys, where=where)


def _count(keys: Iterable[str], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def shape_from_diffusers_config(config: dict[str, Any]) -> Flux2Shape:
    heads, head_dim = config.get("num_attention_heads", 48), config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 128)
    return Flux2Shape(
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=config.get("num_layers", 8),
        depth_single=config.get("num_single_layers", 48),
        axes_dim=tuple(config.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=float(config.get("rope_theta", 2000)),
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,
        context_in_dim=config.get("joint_attention_dim", 15360),
        mlp_ratio=float(config.get("mlp_ratio", 3.0)),
        guidance_embed=bool(config.get("guidance_embeds", True)),
    )


def diffusers_config(shape: Flux2Shape) -> dict[str, Any]:
    return {
        "_class_name": "Flux2Transformer2DModel",
        "_diffusers_version": "0.36.0",
        "patch_size": 1,
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels if shape.out_channels != shape.in_channels else None,
        "num_layers": shape.depth,
        "num_single_layers": shape.depth_single,
        "attention_head_dim": shape.hidden_size // shape.num_heads,
        "num_attention_heads": shape.num_heads,
        "joint_attention_dim": shape.context_in_dim,
        "timestep_guidance_channels": 256,
        "mlp_ratio": shape.mlp_ratio,
        "axes_dims_rope": list(shape.axes_dim),
        "rope_theta": int(shape.theta) if float(shape.theta).is_integer() else shape.theta,
        "eps": 1e-6,
        "guidance_embeds": shape.guidance_embed,
    }


def _axes(head_dim: int, axes_dim: Iterable[int] | None) -> tuple[int, ...]:
    # every released Flux.2 model splits a head evenly over the 4 position axes
    if axes_dim is not None:
        return tuple(axes_dim)
    return (head_dim // 4,) * 4


def shape_from_keys(
    keys: set[str],
    shape_of: Callable[[str], tuple[int, ...]],
    *,
    layout: str,
    axes_dim: Iterable[int] | None = None,
    theta: float = 2000.0,
) -> Flux2Shape:
    """Sizes of a single file (prefix removed) from its keys and a few small tensors' shapes;
    ``layout`` "original" (BFL names) or "diffusers"."""
    if layout == "original":
        names = dict(
            img_in="img_in.weight", txt_in="txt_in.weight", out="final_layer.linear.weight",
            qnorm="double_blocks.0.img_attn.norm.query_norm.scale", mlp="double_blocks.0.img_mlp.2.weight",
            double="double_blocks.", single="single_blocks.", guidance="guidance_in.in_layer.weight",
        )  # fmt: skip
    else:
        names = dict(
            img_in="x_embedder.weight", txt_in="context_embedder.weight", out="proj_out.weight",
            qnorm="transformer_blocks.0.attn.norm_q.weight", mlp="transformer_blocks.0.ff.linear_out.weight",
            double="transformer_blocks.", single="single_transformer_blocks.",
            guidance="time_guidance_embed.guidance_embedder.linear_1.weight",
        )  # fmt: skip
    hidden, in_channels = shape_of(names["img_in"])
    head_dim = shape_of(names["qnorm"])[0]
    mlp_hidden = shape_of(names["mlp"])[1]
    return Flux2Shape(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=_count(keys, names["double"]),
        depth_single=_count(keys, names["single"]),
        axes_dim=_axes(head_dim, axes_dim),
        theta=theta,
        in_channels=in_channels,
        out_channels=shape_of(names["out"])[0],
        context_in_dim=shape_of(names["txt_in"])[1],
        mlp_ratio=mlp_hidden / hidden,
        guidance_embed=names["guidance"] in keys,
    )
