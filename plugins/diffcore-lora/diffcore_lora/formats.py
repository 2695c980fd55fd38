"""Adapter files: building kohya and PEFT state dicts, and reading either back.

kohya/ComfyUI: ``<lora_unet_...>.lora_down.weight`` (r, in[, k, k]), ``.lora_up.weight``
(out, r[, 1, 1]), ``.alpha`` (always written: ComfyUI reads a missing alpha as scale 1, kohya as
alpha = rank), DoRA ``.dora_scale`` (out, 1[, 1, 1]); LyCORIS ``lokr_*`` and ``hada_*`` tensors.
PEFT/diffusers: ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight`` /
``.lora_magnitude_vector``, with r and lora_alpha in the ``lora_adapter_metadata`` header entry that
diffusers and PEFT read. A fused layer (Flux qkv) is written as its diffusers parts: lora_A shared,
lora_B split by rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from diffcore.errors import UserError
from diffcore_lora.branches import Branch, DoraBranch, LohaBranch, LokrBranch, LoraBranch
from diffcore_lora.naming import Target

METADATA_KEY = "lora_adapter_metadata"
_PEFT_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector",
    ".alpha",
)


@attrs.define
class Group:
    """The tensors of one layer read from a file, under kohya names (without alpha)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    rank: int


# -- writing ---------------------------------------------------------------------------------------
def kohya_state_dict(targets: Sequence[Target], branches: Mapping[str, Branch]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for target in targets:
        branch = branches[target.ident]
        for name, value in branch.kohya_tensors().items():
            out[f"{target.kohya}.{name}"] = value.detach()
        out[f"{target.kohya}.alpha"] = torch.tensor(branch.alpha, dtype=torch.float32)
    return out


def _peft_branch(target: Target, branch: Branch) -> LoraBranch:
    if not isinstance(branch, LoraBranch):
        raise UserError(
            f"a {branch.kind} adapter has no PEFT/diffusers file format",
            where="$.adapter.save_format",
            hint="save LoKr and LoHa in the kohya/LyCORIS format (save_format: kohya)",
        )
    if not target.peft:
        raise UserError(f"layer {target.path} has no diffusers name", hint="save in the kohya format")
    return branch


def peft_state_dict(targets: Sequence[Target], branches: Mapping[str, Branch]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for target in targets:
        branch = _peft_branch(target, branches[target.ident])
        for name, rows in target.peft:
            up = branch.lora_up if rows is None else branch.lora_up[rows]
            # clones: the parts of a fused layer must not share storage in a safetensors file
            fused = rows is not None
            out[f"{name}.lora_A.weight"] = (
                branch.lora_down.detach().clone() if fused else branch.lora_down.detach()
            )
            out[f"{name}.lora_B.weight"] = up.detach().clone() if fused else up.detach()
            if isinstance(branch, DoraBranch):
                m = branch.magnitude if rows is None else branch.magnitude[rows]
                # PEFT keeps a conv magnitude as (1, out, 1, 1)
                out[f"{name}.lora_magnitude_vector"] = (
                    (m.view(1, -1, 1, 1) if branch.is_conv else m).detach().clone()
                )
    return out


def peft_metadata(targets: Sequence[Target], branches: Mapping[str, Branch]) -> dict[str, str]:
    """``lora_adapter_metadata``: per diffusers component, the PEFT LoraConfig fields (flattened as
    "<component>.<field>", the way diffusers writes it), with rank/alpha patterns for odd layers."""
    per_component: dict[str, list[tuple[str, LoraBranch]]] = {}
    for target in targets:
        branch = _peft_branch(target, branches[target.ident])
        for name, _ in target.peft:
            component, _, path = name.partition(".")
            per_component.setdefault(component, []).append((path, branch))
    flat: dict[str, Any] = {}
    for component, entries in per_component.items():
        (rank, alpha), _ = Counter((b.rank, b.alpha) for _, b in entries).most_common(1)[0]
        rank_pattern = {p: b.rank for p, b in entries if b.rank != rank}
        alpha_pattern = {p: b.alpha for p, b in entries if b.alpha != alpha}
        fields = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({p for p, _ in entries}),
            "use_dora": any(isinstance(b, DoraBranch) for _, b in entries),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
        }
        flat.update({f"{component}.{k}": v for k, v in fields.items()})
    return {METADATA_KEY: json.dumps(flat, sort_keys=True)}


# -- reading ---------------------------------------------------------------------------------------
def is_peft(keys: Sequence[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def _kind_of(names: set[str], where: str) -> tuple[str, int]:
    if "lora_down.weight" in names:
        return ("dora" if "dora_scale" in names else "lora"), 0
    if any(n.startswith("lokr_") for n in names):
        return "lokr", 0
    if any(n.startswith("hada_") for n in names):
        if "hada_t1" in names:
            raise UserError("LoHa files with a Tucker core (hada_t1) are not supported", where=where)
        return "loha", 0
    raise UserError(f"unrecognised adapter tensors {sorted(names)}", where=where)


def _rank_of(kind: str, tensors: Mapping[str, torch.Tensor]) -> int:
    if kind in ("lora", "dora"):
        return tensors["lora_down.weight"].shape[0]
    if kind == "loha":
        return tensors["hada_w1_b"].shape[0]
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in tensors:
            return tensors[name].shape[0]
    return 1


def _unknown(keys: Sequence[str], where: str) -> UserError:
    return UserError(
        f"{len(keys)} adapter keys name no adapted layer of this model (e.g. {', '.join(sorted(keys)[:3])})",
        where=where,
        hint="is the file for this architecture, and were the same layers targeted?",
    )


def parse(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    pool: Sequence[Target],
    *,
    where: str,
    strict: bool = True,
) -> dict[str, Group]:
    """Group a file's tensors by the layer of ``pool`` they belong to (kohya or PEFT, detected).

    Every key must be used: a key that names no layer of ``pool`` is an error.
    """
    if is_peft(list(tensors)):
        return _parse_peft(tensors, metadata, pool, where)
    by_name = {alias: t for t in pool for alias in t.kohya_aliases}
    by_name.update({t.kohya: t for t in pool})
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module not in by_name:
            unknown.append(key)
            continue
        grouped.setdefault(module, {})[suffix] = value
    if unknown and strict:
        raise _unknown(unknown, where)
    out = {}
    for module, group in grouped.items():
        alpha = group.pop("alpha", None)
        kind, _ = _kind_of(set(group), f"{where}: {module}")
        out[by_name[module].ident] = Group(
            kind, group, None if alpha is None else float(alpha.float()), _rank_of(kind, group)
        )
    return out


def _peft_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def _peft_alpha(config: Mapping[str, Any], name: str, rank: int) -> float:
    component, _, path = name.partition(".")
    alpha_pattern = config.get(f"{component}.alpha_pattern") or {}
    for pattern, value in alpha_pattern.items():
        if path == pattern or path.endswith("." + pattern):
            return float(value)
    alpha = config.get(f"{component}.lora_alpha")
    # diffusers and PEFT read a missing alpha as alpha = rank (scale 1)
    return float(alpha) if alpha is not None else float(rank)


def _parse_peft(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], pool: Sequence[Target], where: str
) -> dict[str, Group]:
    config = _peft_config(metadata)
    by_name: dict[str, tuple[Target, slice | None]] = {}
    for target in pool:
        for name in target.aliases:
            by_name[name] = (target, None)
        for name, rows in target.peft:
            by_name[name] = (target, rows)
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in tensors.items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        name = key[: -len(suffix)] if suffix else None
        if name is None or name not in by_name:
            unknown.append(key)
            continue
        parts.setdefault(name, {})[suffix] = value
    if unknown:
        raise _unknown(unknown, where)
    per_target: dict[str, list[tuple[slice | None, str, dict[str, torch.Tensor]]]] = {}
    targets: dict[str, Target] = {}
    for name, found in parts.items():
        target, rows = by_name[name]
        if ".lora_A.weight" not in found or ".lora_B.weight" not in found:
            raise UserError(f"{name} lacks lora_A or lora_B", where=where)
        per_target.setdefault(target.ident, []).append((rows, name, found))
        targets[target.ident] = target
    out = {}
    for ident, pieces in per_target.items():
        out[ident] = _assemble(targets[ident], pieces, config, where)
    return out


def _assemble(
    target: Target,
    pieces: list[tuple[slice | None, str, dict[str, torch.Tensor]]],
    config: Mapping[str, Any],
    where: str,
) -> Group:
    """One layer's kohya-named tensors from its PEFT part(s); a fused layer's parts become one branch."""
    dora = any(".lora_magnitude_vector" in f or ".lora_magnitude_vector.weight" in f for _, _, f in pieces)
    if len(pieces) == 1 and pieces[0][0] is None:
        _, name, found = pieces[0]
        down, up = found[".lora_A.weight"], found[".lora_B.weight"]
        rank = down.shape[0]
        alpha = float(found[".alpha"]) if ".alpha" in found else _peft_alpha(config, name, rank)
        tensors = {"lora_down.weight": down, "lora_up.weight": up}
        if dora:
            tensors["dora_scale"] = _magnitude(found).reshape(up.shape[0], *(1,) * (down.dim() - 1))
        return Group("dora" if dora else "lora", tensors, alpha, rank)
    # Fused: stack the parts' rows. Shared lora_A keeps the rank; different A's go block-diagonal
    # (rank = sum), with each part's scale folded into its rows of up so one alpha = rank fits all.
    layer = target.layer
    out_features = layer.weight.shape[0]
    pieces = sorted(pieces, key=lambda p: p[0].start if p[0] is not None else 0)
    downs = [f[".lora_A.weight"] for _, _, f in pieces]
    scales = []
    for _, name, f in pieces:
        r = f[".lora_A.weight"].shape[0]
        alpha = float(f[".alpha"]) if ".alpha" in f else _peft_alpha(config, name, r)
        scales.append(alpha / r)
    shared = (
        all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs) and len(set(scales)) == 1
    )
    ref = downs[0]
    if shared:
        down = ref
        rank = ref.shape[0]
        up = torch.zeros((out_features, rank, *pieces[0][2][".lora_B.weight"].shape[2:]), dtype=ref.dtype)
        for rows, _, f in pieces:
            up[rows] = f[".lora_B.weight"].to(ref.dtype)
        alpha = scales[0] * rank
    else:
        down = torch.cat([d.to(ref.dtype) for d in downs], dim=0)
        rank = down.shape[0]
        up = torch.zeros((out_features, rank, *pieces[0][2][".lora_B.weight"].shape[2:]), dtype=ref.dtype)
        col = 0
        for (rows, _, f), scale in zip(pieces, scales):
            b = f[".lora_B.weight"].to(ref.dtype)
            up[rows, col : col + b.shape[1]] = b * scale
            col += b.shape[1]
        alpha = float(rank)
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    if dora:
        mag = torch.zeros(out_features, dtype=ref.dtype)
        for rows, _, f in pieces:
            mag[rows] = _magnitude(f).flatten().to(ref.dtype)
        tensors["dora_scale"] = mag.view(out_features, *(1,) * (down.dim() - 1))
    return Group("dora" if dora else "lora", tensors, alpha, rank)


def _magnitude(found: Mapping[str, torch.Tensor]) -> torch.Tensor:
    m = found.get(".lora_magnitude_vector", found.get(".lora_magnitude_vector.weight"))
    return m.flatten()


def branch_for(group: Group, layer: nn.Module) -> Branch:
    """A branch shaped for ``group`` on ``layer`` (for files loaded at sampling time)."""
    alpha = group.alpha if group.alpha is not None else float(group.rank)
    dtype = layer.weight.dtype
    if group.kind == "lokr":
        return LokrBranch.from_tensors(layer, group.tensors, group.alpha)
    if group.kind == "loha":
        return LohaBranch(layer, group.rank, alpha, dtype=dtype)
    cls = DoraBranch if group.kind == "dora" else LoraBranch
    return cls(layer, group.rank, alpha, dtype=dtype)
