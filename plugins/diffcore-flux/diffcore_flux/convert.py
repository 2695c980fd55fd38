"""Key maps between diffcore's Flux modules, BFL's original files and diffusers' FluxTransformer2DModel.

diffcore's module paths are BFL's, so the original layout differs only in the QK-norm gain name
(``scale`` there, ``weight`` here) and an optional ``model.diffusion_model.`` prefix (ComfyUI files).
diffusers splits BFL's fused projections: ``img_attn.qkv`` into ``to_q/k/v`` and a single block's
``linear1`` into ``to_q/k/v`` + ``proj_mlp``; the final modulation's halves are swapped
(BFL shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from diffcore_flux.config import TransformerShape

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_NORM_GAIN = re.compile(r"(\.(?:query|key)_norm)\.(scale|weight)$")

# (native module regex, diffusers module template(s), how the rows split)
_DOUBLE = "transformer_blocks.{0}."
_SINGLE = "single_transformer_blocks.{0}."
_RULES: list[tuple[str, tuple[str, ...], str]] = [
    (r"img_in", ("x_embedder",), ""),
    (r"txt_in", ("context_embedder",), ""),
    (r"time_in\.(in|out)_layer", ("time_text_embed.timestep_embedder.linear_{L}",), ""),
    (r"vector_in\.(in|out)_layer", ("time_text_embed.text_embedder.linear_{L}",), ""),
    (r"guidance_in\.(in|out)_layer", ("time_text_embed.guidance_embedder.linear_{L}",), ""),
    (r"final_layer\.linear", ("proj_out",), ""),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), "swap"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", (_DOUBLE + "norm1.linear",), ""),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", (_DOUBLE + "norm1_context.linear",), ""),
    (r"double_blocks\.(\d+)\.img_attn\.qkv", tuple(_DOUBLE + f"attn.to_{x}" for x in "qkv"), "qkv"),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", tuple(_DOUBLE + f"attn.add_{x}_proj" for x in "qkv"), "qkv"),
    (r"double_blocks\.(\d+)\.img_attn\.proj", (_DOUBLE + "attn.to_out.0",), ""),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", (_DOUBLE + "attn.to_add_out",), ""),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm", (_DOUBLE + "attn.norm_q",), ""),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm", (_DOUBLE + "attn.norm_k",), ""),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm", (_DOUBLE + "attn.norm_added_q",), ""),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm", (_DOUBLE + "attn.norm_added_k",), ""),
    (r"double_blocks\.(\d+)\.img_mlp\.0", (_DOUBLE + "ff.net.0.proj",), ""),
    (r"double_blocks\.(\d+)\.img_mlp\.2", (_DOUBLE + "ff.net.2",), ""),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", (_DOUBLE + "ff_context.net.0.proj",), ""),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", (_DOUBLE + "ff_context.net.2",), ""),
    (
        r"single_blocks\.(\d+)\.linear1",
        tuple(_SINGLE + x for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
        "linear1",
    ),
    (r"single_blocks\.(\d+)\.linear2", (_SINGLE + "proj_out",), ""),
    (r"single_blocks\.(\d+)\.modulation\.lin", (_SINGLE + "norm.linear",), ""),
    (r"single_blocks\.(\d+)\.norm\.query_norm", (_SINGLE + "attn.norm_q",), ""),
    (r"single_blocks\.(\d+)\.norm\.key_norm", (_SINGLE + "attn.norm_k",), ""),
]
_COMPILED = [(re.compile(pattern + "$"), names, split) for pattern, names, split in _RULES]


def diffusers_modules(path: str, dim: int) -> tuple[list[tuple[str, int | None]], str] | None:
    """The diffusers module(s) holding native module ``path``, each with its row count in a fused
    weight (None when not fused), and the split kind ("", "qkv", "linear1", "swap"); None if unmapped."""
    for pattern, names, split in _COMPILED:
        m = pattern.match(path)
        if not m:
            continue
        group = m.group(1) if m.groups() else ""
        filled = [n.format(group, L="1" if group == "in" else "2") for n in names]
        if split == "qkv":
            return [(n, dim) for n in filled], split
        if split == "linear1":
            return [(n, dim) for n in filled[:3]] + [(filled[3], None)], split
        return [(filled[0], None)], split
    return None


def _parts(tensor: torch.Tensor, split: str, dim: int) -> list[torch.Tensor]:
    if split == "qkv":
        return list(tensor.chunk(3, dim=0))
    if split == "linear1":
        return list(tensor.split((dim, dim, dim, tensor.shape[0] - 3 * dim), dim=0))
    if split == "swap":
        return [torch.cat(tensor.chunk(2, dim=0)[::-1])]
    return [tensor]


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def to_diffusers(state: Iterable[tuple[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """Native (diffcore) tensors -> diffusers FluxTransformer2DModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state:
        module, leaf = _split_key(key)
        mapped = diffusers_modules(module, dim)
        if mapped is None:
            raise KeyError(f"no diffusers name for {key}")
        targets, split = mapped
        for (name, _), part in zip(targets, _parts(tensor, split, dim), strict=True):
            out[f"{name}.{leaf}"] = part
    return out


def to_original(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native tensors -> BFL's original single-file keys."""
    return {_NORM_GAIN.sub(r"\1.scale", key): tensor for key, tensor in state}


def original_rename(keys: Iterable[str]) -> Any:
    """A ``load_into`` rename for an original file: strips a ComfyUI prefix (dropping the VAE and text
    encoder keys of all-in-one files) and renames the QK-norm gains."""
    prefix = next((p for p in ORIGINAL_PREFIXES if any(k.startswith(p) for k in keys)), "")

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        return _NORM_GAIN.sub(r"\1.weight", key[len(prefix) :])

    return rename, prefix


def from_diffusers(
    items: Iterable[tuple[str, torch.Tensor]], native_keys: Iterable[str], dim: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream diffusers tensors as native ones, fusing split projections once all their parts arrived.

    Keys with no native counterpart pass through unchanged (``load_into`` reports them as unexpected).
    """
    where: dict[str, tuple[str, int, int, str]] = {}
    for key in native_keys:
        module, leaf = _split_key(key)
        mapped = diffusers_modules(module, dim)
        if mapped is None:
            continue
        targets, split = mapped
        for i, (name, _) in enumerate(targets):
            where[f"{name}.{leaf}"] = (key, i, len(targets), split)
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in items:
        if key not in where:
            yield key, tensor
            continue
        native, index, count, split = where[key]
        if count == 1:
            yield native, _parts(tensor, split, dim)[0]
            continue
        parts = pending.setdefault(native, {})
        parts[index] = tensor
        if len(parts) == count:
            del pending[native]
            yield native, torch.cat([parts[i] for i in range(count)], dim=0)
    # A fused weight with parts missing is never yielded, so load_into reports it as missing.


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
    """Sizes of a BFL file from its (renamed) keys and a few small tensors' shapes."""

    def count(prefix: str) -> int:
        found = {int(k.split(".")[1]) for k in keys if k.startswith(prefix)}
        return max(found) + 1 if found else 0

    hidden, in_channels = shape_of("img_in.weight")
    head_dim = shape_of("double_blocks.0.img_attn.norm.query_norm.weight")[0]
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
