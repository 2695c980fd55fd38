"""Key maps between diffcore's DiT and the two published layouts, as :mod:`diffcore.keymap` rules.

* original (facebookresearch/DiT ``models.py``): diffcore's names except the timestep MLP
  (``t_embedder.mlp.0/2``), plus the fixed ``pos_embed`` tensor that the original saves.
* diffusers (``DiTTransformer2DModel``): ``pos_embed.proj``; per block ``attn1.to_q/k/v`` (diffcore
  fuses them into ``attn.qkv``), ``attn1.to_out.0``, ``ff.net.0.proj``/``ff.net.2``, ``norm1.linear``;
  ``proj_out_1``/``proj_out_2`` for the final layer. diffusers keeps a copy of the timestep and class
  embedders in every block (``norm1.emb``) where the original shares one; diffcore shares one, writes
  a copy per block and on reading requires the copies to agree.

Every function streams: tensors are read and converted one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from diffcore.keymap import Drop, KeyMap, Rule, Split, Tie

ORIGINAL_RULES = (
    Rule("t_embedder.linear_1", "t_embedder.mlp.0"),
    Rule("t_embedder.linear_2", "t_embedder.mlp.2"),
    Drop("pos_embed"),  # fixed positions, which diffcore recomputes
    Rule("*", "*"),
)
ORIGINAL = KeyMap(ORIGINAL_RULES, name="original")

_SHARED = Tie(
    "i",
    "depth",
    message="block {index}'s timestep/class embedder differs from block 0's",
    hint="diffcore's DiT shares one embedder as the original does; this checkpoint was trained with "
    "per-block copies and cannot be loaded exactly",
)
_BLOCK = "transformer_blocks.{i}."
DIFFUSERS_RULES = (
    Rule("x_embedder.proj", "pos_embed.proj"),
    Rule("final_layer.adaLN_modulation.1", "proj_out_1"),
    Rule("final_layer.linear", "proj_out_2"),
    Rule("t_embedder.linear_1", _BLOCK + "norm1.emb.timestep_embedder.linear_1", _SHARED),
    Rule("t_embedder.linear_2", _BLOCK + "norm1.emb.timestep_embedder.linear_2", _SHARED),
    Rule("y_embedder.embedding_table", _BLOCK + "norm1.emb.class_embedder.embedding_table", _SHARED),
    Rule("blocks.{i}.attn.qkv", tuple(_BLOCK + f"attn1.to_{x}" for x in "qkv"), Split()),
    Rule("blocks.{i}.attn.proj", _BLOCK + "attn1.to_out.0"),
    Rule("blocks.{i}.mlp.fc1", _BLOCK + "ff.net.0.proj"),
    Rule("blocks.{i}.mlp.fc2", _BLOCK + "ff.net.2"),
    Rule("blocks.{i}.adaLN_modulation.1", _BLOCK + "norm1.linear"),
)


# -- original ------------------------------------------------------------------------------------
def original_key(key: str) -> str:
    """diffcore name -> original name."""
    return ORIGINAL.file_name(key) or key


def from_original(
    items: Iterable[tuple[str, torch.Tensor]], module_keys: Iterable[str], *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an original checkpoint as diffcore names (its fixed positions are read past)."""
    return ORIGINAL.load(items, module_keys, where=where)


def to_original(state: Mapping[str, torch.Tensor], pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    out = dict(ORIGINAL.save(state))
    out["pos_embed"] = pos_embed  # the original keeps its fixed positions in the checkpoint
    return out


# -- diffusers -----------------------------------------------------------------------------------
def diffusers(depth: int) -> KeyMap:
    return KeyMap.of(DIFFUSERS_RULES, {"depth": depth}, name="diffusers")


def to_diffusers(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffcore state dict -> diffusers state dict (embedders copied into every block)."""
    return dict(diffusers(depth).save(state))


def from_diffusers(
    items: Iterable[tuple[str, torch.Tensor]], module_keys: Iterable[str], depth: int, *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a diffusers checkpoint as (diffcore name, tensor), fusing q/k/v and keeping one copy of
    the per-block embedders (a UserError if the copies differ)."""
    return diffusers(depth).load(items, module_keys, where=where)


def diffusers_module_name(path: str) -> str | None:
    """diffusers' name for diffcore module ``path`` (None for the fused ``attn.qkv``, which diffusers
    splits into three)."""
    return diffusers(1).file_name(path)


def diffusers_module_names(path: str) -> tuple[str, ...] | None:
    """diffusers' names for diffcore module ``path``: one, or three for the fused ``attn.qkv``."""
    return diffusers(1).file_names(path)
