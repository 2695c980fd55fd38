"""Key maps between diffcore's SD3 modules, the original single file and diffusers'
SD3Transformer2DModel, as :mod:`diffcore.keymap` rules.

diffcore's module paths are the original file's, so that layout is the identity (plus the
``model.diffusion_model.`` prefix). diffusers splits the fused ``attn.qkv`` into ``to_q/k/v`` (the
text stream's into ``add_q/k/v_proj``), and stores the halves of the final modulation and of the last
block's text modulation in the other order (original shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from diffcore.keymap import KeyMap, Rule, Split, SwapHalves
from diffcore_sd3.config import TransformerShape

PREFIX = "model.diffusion_model."

_B = "transformer_blocks.{i}."
_X = "joint_blocks.{i}.x_block."
_C = "joint_blocks.{i}.context_block."
_QKV = Split(("dim", "dim", "dim"))

_RULES = (
    Rule("pos_embed", "pos_embed.pos_embed"),
    Rule("x_embedder.proj", "pos_embed.proj"),
    Rule("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    Rule("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    Rule("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    Rule("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    Rule("context_embedder", "context_embedder"),
    Rule("final_layer.linear", "proj_out"),
    Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SwapHalves()),
    Rule(_X + "adaLN_modulation.1", _B + "norm1.linear"),
    Rule(_C + "adaLN_modulation.1", _B + "norm1_context.linear"),
    Rule(_X + "attn.qkv", tuple(_B + f"attn.to_{x}" for x in "qkv"), _QKV),
    Rule(_C + "attn.qkv", tuple(_B + f"attn.add_{x}_proj" for x in "qkv"), _QKV),
    Rule(_X + "attn.proj", _B + "attn.to_out.0"),
    Rule(_C + "attn.proj", _B + "attn.to_add_out"),
    Rule(_X + "attn.ln_q", _B + "attn.norm_q"),
    Rule(_X + "attn.ln_k", _B + "attn.norm_k"),
    Rule(_C + "attn.ln_q", _B + "attn.norm_added_q"),
    Rule(_C + "attn.ln_k", _B + "attn.norm_added_k"),
    Rule(_X + "attn2.qkv", tuple(_B + f"attn2.to_{x}" for x in "qkv"), _QKV),
    Rule(_X + "attn2.proj", _B + "attn2.to_out.0"),
    Rule(_X + "attn2.ln_q", _B + "attn2.norm_q"),
    Rule(_X + "attn2.ln_k", _B + "attn2.norm_k"),
    Rule(_X + "mlp.fc1", _B + "ff.net.0.proj"),
    Rule(_X + "mlp.fc2", _B + "ff.net.2"),
    Rule(_C + "mlp.fc1", _B + "ff_context.net.0.proj"),
    Rule(_C + "mlp.fc2", _B + "ff_context.net.2"),
)

ORIGINAL = KeyMap((Rule("*", "*"),), name="original")


def diffusers(shape: TransformerShape) -> KeyMap:
    """The map for a transformer of ``shape``: its last block's text modulation is swapped too."""
    last = f"joint_blocks.{shape.depth - 1}.context_block.adaLN_modulation.1"
    swapped = Rule(last, f"transformer_blocks.{shape.depth - 1}.norm1_context.linear", SwapHalves())
    return KeyMap.of((swapped, *_RULES), {"dim": shape.hidden_size}, name="diffusers")


def swapped_modules(shape: TransformerShape) -> tuple[str, ...]:
    """Native modules whose output halves diffusers stores in the other order."""
    return ("final_layer.adaLN_modulation.1", f"joint_blocks.{shape.depth - 1}.context_block.adaLN_modulation.1")


def diffusers_modules(path: str, shape: TransformerShape) -> str | list[tuple[str, int | None]] | None:
    """The diffusers module holding native module ``path``, or for a fused qkv the three modules
    with the rows each owns; None if unmapped."""
    keymap = diffusers(shape)
    names = keymap.file_names(path)
    if names is None:
        return None
    rows = keymap.rows(path)
    if rows is None:
        return names[0]
    return list(zip(names, rows, strict=True))


def to_diffusers(state: Iterable[tuple[str, torch.Tensor]], shape: TransformerShape) -> dict[str, torch.Tensor]:
    return dict(diffusers(shape).save(state))


def from_diffusers(
    items: Iterable[tuple[str, torch.Tensor]],
    native_keys: Iterable[str],
    shape: TransformerShape,
    *,
    where: str = "diffusers weights",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream diffusers tensors as native ones, fusing q/k/v once all three arrived."""
    return diffusers(shape).load(items, native_keys, where=where)


def to_original(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native tensors -> the original single file's keys (with its ``model.diffusion_model.`` prefix)."""
    return {PREFIX + k: v for k, v in ORIGINAL.save(state)}


def from_original(
    items: Iterable[tuple[str, torch.Tensor]], native_keys: Iterable[str], *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an original file's transformer tensors (prefix removed) as native ones."""
    return ORIGINAL.load(items, native_keys, where=where)


def _count(keys: Iterable[str], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _dual(keys: Iterable[str], prefix: str, marker: str) -> tuple[int, ...]:
    return tuple(sorted({int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix) and marker in k}))


def shape_from_original(keys: set[str], shape_of: Callable[[str], tuple[int, ...]]) -> TransformerShape:
    """Sizes of an original file from its transformer keys (prefix removed) and a few shapes."""
    dim, in_channels, patch, _ = shape_of("x_embedder.proj.weight")
    positions = shape_of("pos_embed")[1]
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in keys
    depth = _count(keys, "joint_blocks.")
    # without q/k norm gains the head size is not stored: Stability's MMDiTs have as many heads as blocks
    heads = dim // shape_of("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk else depth
    return TransformerShape(
        hidden_size=dim,
        num_heads=heads,
        depth=depth,
        in_channels=in_channels,
        patch_size=patch,
        pooled_dim=shape_of("y_embedder.mlp.0.weight")[1],
        context_dim=shape_of("context_embedder.weight")[1],
        pos_embed_max_size=round(positions**0.5),
        qk_norm=qk,
        dual_attention_layers=_dual(keys, "joint_blocks.", ".x_block.attn2."),
        mlp_ratio=shape_of("joint_blocks.0.x_block.mlp.fc1.weight")[0] / dim,
    )


def shape_from_diffusers_config(config: dict[str, Any]) -> TransformerShape:
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    return TransformerShape(
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=config.get("num_layers", 18),
        in_channels=config.get("in_channels", 16),
        patch_size=config.get("patch_size", 2),
        pooled_dim=config.get("pooled_projection_dim", 2048),
        context_dim=config.get("joint_attention_dim", 4096),
        pos_embed_max_size=config.get("pos_embed_max_size", 96),
        sample_size=config.get("sample_size", 128),
        qk_norm=config.get("qk_norm") == "rms_norm",
        dual_attention_layers=tuple(config.get("dual_attention_layers", ())),
    )


def diffusers_config_from_keys(keys: set[str], shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, Any]:
    """The SD3Transformer2DModel config of a diffusers-keyed single file, read from its shapes."""
    dim, in_channels, patch, _ = shape_of("pos_embed.proj.weight")
    qk = "transformer_blocks.0.attn.norm_q.weight" in keys
    depth = _count(keys, "transformer_blocks.")
    head_dim = shape_of("transformer_blocks.0.attn.norm_q.weight")[0] if qk else dim // depth
    return {
        "in_channels": in_channels,
        "patch_size": patch,
        "num_layers": depth,
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": shape_of("context_embedder.weight")[1],
        "caption_projection_dim": dim,
        "pooled_projection_dim": shape_of("time_text_embed.text_embedder.linear_1.weight")[1],
        "pos_embed_max_size": round(shape_of("pos_embed.pos_embed")[1] ** 0.5),
        "qk_norm": "rms_norm" if qk else None,
        "dual_attention_layers": list(_dual(keys, "transformer_blocks.", ".attn2.")),
    }


def diffusers_config(shape: TransformerShape) -> dict[str, Any]:
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": "0.31.0",
        "sample_size": shape.sample_size,
        "patch_size": shape.patch_size,
        "in_channels": shape.in_channels,
        "num_layers": shape.depth,
        "attention_head_dim": shape.head_dim,
        "num_attention_heads": shape.num_heads,
        "joint_attention_dim": shape.context_dim,
        "caption_projection_dim": shape.hidden_size,
        "pooled_projection_dim": shape.pooled_dim,
        "out_channels": shape.in_channels,
        "pos_embed_max_size": shape.pos_embed_max_size,
        "dual_attention_layers": list(shape.dual_attention_layers),
        "qk_norm": "rms_norm" if shape.qk_norm else None,
    }
