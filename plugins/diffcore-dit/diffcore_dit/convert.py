"""Key maps between diffcore's DiT and the two published layouts.

* original (facebookresearch/DiT ``models.py``): diffcore's names except the timestep MLP
  (``t_embedder.mlp.0/2``), plus the fixed ``pos_embed`` tensor that the original saves.
* diffusers (``DiTTransformer2DModel``): ``pos_embed.proj``; per block ``attn1.to_q/k/v`` (diffcore
  fuses them into ``attn.qkv``), ``attn1.to_out.0``, ``ff.net.0.proj``/``ff.net.2``, ``norm1.linear``;
  ``proj_out_1``/``proj_out_2`` for the final layer. diffusers keeps a copy of the timestep and class
  embedders in every block (``norm1.emb``) where the original shares one; diffcore shares one, writes
  a copy per block and on reading requires the copies to agree.

Every function streams: ``get(key)`` reads one tensor of the source at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from diffcore.errors import UserError

Getter = Callable[[str], torch.Tensor]

_ORIGINAL_RENAMES = {"t_embedder.linear_1.": "t_embedder.mlp.0.", "t_embedder.linear_2.": "t_embedder.mlp.2."}
_EMB = "norm1.emb."
_DIFFUSERS_TOP = {
    "x_embedder.proj.": "pos_embed.proj.",
    "final_layer.adaLN_modulation.1.": "proj_out_1.",
    "final_layer.linear.": "proj_out_2.",
}
_DIFFUSERS_BLOCK = {
    "attn.proj.": "attn1.to_out.0.",
    "mlp.fc1.": "ff.net.0.proj.",
    "mlp.fc2.": "ff.net.2.",
    "adaLN_modulation.1.": "norm1.linear.",
}
_DIFFUSERS_EMB = {
    "t_embedder.linear_1.": "timestep_embedder.linear_1.",
    "t_embedder.linear_2.": "timestep_embedder.linear_2.",
    "y_embedder.embedding_table.": "class_embedder.embedding_table.",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _swap_prefix(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


# -- original ------------------------------------------------------------------------------------
def original_key(key: str) -> str:
    """diffcore name -> original name."""
    return _swap_prefix(key, _ORIGINAL_RENAMES) or key


def from_original_key(key: str) -> str | None:
    """Original name -> diffcore name (None for the fixed positions, which diffcore recomputes)."""
    if key == "pos_embed":
        return None
    inverse = {v: k for k, v in _ORIGINAL_RENAMES.items()}
    return _swap_prefix(key, inverse) or key


def to_original(state: dict[str, torch.Tensor], pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {original_key(k): v for k, v in state.items()}
    out["pos_embed"] = pos_embed  # the original keeps its fixed positions in the checkpoint
    return out


# -- diffusers -----------------------------------------------------------------------------------
def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffcore state dict -> diffusers state dict (embedders copied into every block)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top = _swap_prefix(key, _DIFFUSERS_TOP)
        if top is not None:
            out[top] = value
            continue
        emb = _swap_prefix(key, _DIFFUSERS_EMB)
        if emb is not None:
            for i in range(depth):
                # distinct storage: safetensors refuses tensors that share memory
                out[f"transformer_blocks.{i}.{_EMB}{emb}"] = value if i == 0 else value.clone()
            continue
        match = _BLOCK.match(key)
        if match is None:
            raise KeyError(f"no diffusers name for {key}")
        i, rest = match.groups()
        prefix = f"transformer_blocks.{i}."
        if rest.startswith("attn.qkv."):
            leaf = rest[len("attn.qkv.") :]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{prefix}attn1.{name}.{leaf}"] = part.clone()
        else:
            out[prefix + _swap_prefix(rest, _DIFFUSERS_BLOCK)] = value
    return out


def from_diffusers(
    keys: list[str], get: Getter, depth: int, *, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a diffusers checkpoint as (diffcore name, tensor); unknown keys pass through unchanged
    so that the strict loader names them."""
    inverse_top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    inverse_block = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    inverse_emb = {v: k for k, v in _DIFFUSERS_EMB.items()}
    keyset = set(keys)
    shared: dict[str, torch.Tensor] = {}
    for key in keys:
        top = _swap_prefix(key, inverse_top)
        if top is not None:
            yield top, get(key)
            continue
        match = re.match(r"^transformer_blocks\.(\d+)\.(.*)$", key)
        if match is None:
            yield key, get(key)
            continue
        i, rest = match.groups()
        if rest.startswith(_EMB):
            name = _swap_prefix(rest[len(_EMB) :], inverse_emb)
            if name is None:
                yield key, get(key)
            elif i == "0":
                shared[name] = get(key)
                yield name, shared[name]
            continue
        if rest.startswith("attn1.to_q."):
            leaf = rest[len("attn1.to_q.") :]
            parts = [f"transformer_blocks.{i}.attn1.{n}.{leaf}" for n in ("to_q", "to_k", "to_v")]
            if all(p in keyset for p in parts):
                yield f"blocks.{i}.attn.qkv.{leaf}", torch.cat([get(p) for p in parts], dim=0)
                continue
        if rest.startswith(("attn1.to_k.", "attn1.to_v.")):
            leaf = rest.split(".", 2)[2]
            if f"transformer_blocks.{i}.attn1.to_q.{leaf}" in keyset:
                continue  # fused with its to_q above
        renamed = _swap_prefix(rest, inverse_block)
        yield (f"blocks.{i}.{renamed}" if renamed is not None else key), get(key)
    # diffcore shares the embedders: a checkpoint whose per-block copies differ cannot be represented
    for i in range(1, depth):
        for diff_name, name in inverse_emb.items():
            for leaf in ("weight", "bias"):
                key = f"transformer_blocks.{i}.{_EMB}{diff_name}{leaf}"
                if key in keyset and name + leaf in shared and not torch.equal(get(key), shared[name + leaf]):
                    raise UserError(
                        f"block {i}'s timestep/class embedder differs from block 0's",
                        where=where,
                        hint="diffcore's DiT shares one embedder as the original does; this checkpoint "
                        "was trained with per-block copies and cannot be loaded exactly",
                    )


def diffusers_module_name(path: str) -> str | None:
    """diffusers' name for diffcore module ``path`` (None for the fused ``attn.qkv``, which diffusers
    splits into three)."""
    top = _swap_prefix(path + ".", _DIFFUSERS_TOP)
    if top is not None:
        return top[:-1]
    match = _BLOCK.match(path)
    if match is None:
        return path
    i, rest = match.groups()
    renamed = _swap_prefix(rest + ".", _DIFFUSERS_BLOCK)
    return f"transformer_blocks.{i}.{renamed[:-1]}" if renamed is not None else None
