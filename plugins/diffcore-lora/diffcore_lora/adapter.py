"""The adapter object the "lora", "dora", "lokr" and "loha" factories return.

``attach(model)`` injects one branch per matching layer, freezes the rest and returns the branch
parameters; ``save``/``load`` speak the kohya/ComfyUI format (default) and the PEFT/diffusers format;
``merge``/``unmerge`` fold the update into the base weights and take it out again; ``set_strength``
scales it at sampling time; :meth:`NetworkAdapter.apply_adapters` stacks saved files on a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import diffcore
from diffcore.errors import UserError
from diffcore.quantize.tensors import is_quantized
from diffcore.weights import Checkpoint, save_safetensors
from diffcore_lora import formats
from diffcore_lora.branches import BRANCHES, Branch, DoraBranch, LokrBranch
from diffcore_lora.config import AdapterConfig, DoraConfig, LohaConfig, LokrConfig, LoraConfig
from diffcore_lora.layers import add_branch, refresh, remove_branch
from diffcore_lora.naming import BACKBONE, Target, candidates, components_of

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIGS: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "lokr": LokrConfig,
    "loha": LohaConfig,
}


class NetworkAdapter:
    """An adapter of one kind ("lora", "dora", "lokr", "loha") on the layers of one model."""

    def __init__(self, config: AdapterConfig | None = None, kind: str = "lora"):
        if kind not in BRANCHES:
            raise UserError(f"unknown adapter kind {kind!r}", hint=f"one of {', '.join(BRANCHES)}")
        self.kind = kind
        self.config = config if config is not None else _CONFIGS[kind]()
        self.name = _clean_name(self.config.name or kind)
        self.model: Any = None
        self.targets: list[Target] = []
        self.branches: dict[str, Branch] = {}  # Target.ident -> branch
        self.strength = float(self.config.strength)

    # -- injection -------------------------------------------------------------------------------
    def attach(self, model: Any) -> list[nn.Parameter]:
        """Inject into ``model``'s matching layers, freeze everything else, return the adapter parameters."""
        cfg = self.config
        patterns = (
            cfg.targets if cfg.targets is not None else list(model.adapter_targets)
        )
        if not patterns:
            raise UserError(
                "no layers to adapt: the model names no adapter_targets",
                where="$.adapter.targets",
                hint="list module-name regexes, e.g. ['attn.*to_(q|k|v)']",
            )
        backbone_re = _compile(patterns, "$.adapter.targets")
        te_re = _compile(cfg.text_encoder_targets, "$.adapter.text_encoder_targets")
        exclude_re = _compile(cfg.exclude, "$.adapter.exclude")
        components = components_of(model, cfg.text_encoders)
        missing = [c for c in components if c != BACKBONE and c not in model.frozen]
        if missing:
            raise UserError(
                f"the model has no text encoder named {missing[0]!r}",
                where="$.adapter.text_encoders",
                hint="known: " + (", ".join(model.frozen) or "none"),
            )
        chosen = []
        for target in candidates(model, components, peft_override=cfg.peft_prefix):
            regexes = backbone_re if target.component == BACKBONE else te_re
            if any(r.search(target.path) for r in regexes) and not any(
                r.search(target.path) for r in exclude_re
            ):
                chosen.append(target)
        if not any(t.component == BACKBONE for t in chosen):
            names = [p for p, m in model.backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][
                :5
            ]
            raise UserError(
                f"adapter targets {patterns} match no Linear or Conv2d layer of the backbone",
                where="$.adapter.targets",
                hint=f"layer names look like: {', '.join(names)}",
            )
        model.backbone.requires_grad_(False)
        for module in model.frozen.values():
            module.requires_grad_(False)
        self.model = model
        self.name = _free_name(self.name, [t.layer for t in chosen])
        for target in chosen:
            self._add(target, self._new_branch(target.layer))
        return self.parameters()

    def _new_branch(self, layer: nn.Module) -> Branch:
        cfg = self.config
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        dtype = _DTYPES.get(cfg.dtype)
        drops = {
            "dropout": cfg.dropout,
            "rank_dropout": cfg.rank_dropout,
            "module_dropout": cfg.module_dropout,
        }
        if self.kind in ("lora", "dora"):
            return BRANCHES[self.kind](
                layer, cfg.rank, alpha, init=getattr(cfg, "init", "default"), dtype=dtype, **drops
            )
        if self.kind == "lokr":
            return LokrBranch(
                layer,
                cfg.rank,
                alpha,
                factor=cfg.factor,
                decompose_both=cfg.decompose_both,
                full_matrix=cfg.full_matrix,
                use_tucker=cfg.use_tucker,
                dtype=dtype,
                **drops,
            )
        return BRANCHES[self.kind](layer, cfg.rank, alpha, dtype=dtype, **drops)

    def _add(self, target: Target, branch: Branch) -> None:
        branch.strength = self.strength
        add_branch(target.layer, self.name, branch)
        self.targets.append(target)
        self.branches[target.ident] = branch

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in a stable order (layer by layer)."""
        params = []
        for branch in self.branches.values():
            for p in branch.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def detach(self) -> None:
        """Take the adapter out of the model (merged updates stay in the weights)."""
        for target in self.targets:
            remove_branch(target.layer, self.name)
        self.targets, self.branches = [], {}

    # -- sampling-time controls ------------------------------------------------------------------
    def set_strength(self, strength: float) -> None:
        """Scale this adapter's update (0 turns it off); a merged adapter is re-merged at the new strength."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self.strength = float(strength)
        for target in self.targets:
            self.branches[target.ident].strength = self.strength
            refresh(target.layer)
        if was_merged:
            self.merge()

    @property
    def merged(self) -> bool:
        return any(b.merged for b in self.branches.values())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (at the current strength) into the base weights; the branches stop running."""
        if any(is_quantized(t.layer.weight) for t in self.targets):
            raise UserError(
                "cannot fold an adapter into a quantised base (model.quantize): its weights are frozen int8/fp8/nf4",
                where="$.model.quantize",
                hint="load the model with quantize: none to merge, or keep the adapter unmerged",
            )
        for target in self.targets:
            branch = self.branches[target.ident]
            if branch.merged:
                continue
            weight = target.layer.weight
            if isinstance(branch, DoraBranch):
                new, norm = branch.merged_weight(weight)
                branch._merge_cache = norm
                new = weight.float() + self.strength * (new - weight.float())
            else:
                new = weight.float() + self.strength * branch.delta_weight(weight)
            weight.copy_(new.to(weight.dtype))
            branch.merged = True
            refresh(target.layer)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged update back out of the base weights (exact up to rounding)."""
        for target in reversed(self.targets):
            branch = self.branches[target.ident]
            if not branch.merged:
                continue
            weight = target.layer.weight
            s = self.strength
            if isinstance(branch, DoraBranch):
                # W_m = W * ((1 - s) + s*m/n) + s*(m/n)*scale*dW  ->  solve for W row by row
                shape = (-1,) + (1,) * (weight.dim() - 1)
                ratio = (branch.magnitude.double() / branch._merge_cache.double()).view(shape)
                lora = branch.lora_weight().double() * branch.scale
                old = (weight.double() - s * ratio * lora) / ((1 - s) + s * ratio)
                branch._merge_cache = None
            else:
                old = weight.float() - s * branch.delta_weight(weight)
            weight.copy_(old.to(weight.dtype))
            branch.merged = False
            refresh(target.layer)

    # -- files -----------------------------------------------------------------------------------
    def state_dict(self, fmt: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter tensors under the names of format ``fmt`` ("kohya" default, or "peft")."""
        fmt = fmt or self.config.save_format
        self._require_attached("state_dict")
        if fmt == "kohya":
            return formats.kohya_state_dict(self.targets, self.branches)
        if fmt == "peft":
            return formats.peft_state_dict(self.targets, self.branches)
        raise UserError(f"unknown adapter file format {fmt!r}", hint="use 'kohya' or 'peft'")

    def file_metadata(self, fmt: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        cfg = self.config
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        model = self.model
        meta = {
            "diffcore.version": diffcore.__version__,
            "diffcore.adapter": self.kind,
            "diffcore.format": fmt,
            "diffcore.rank": str(cfg.rank),
            "diffcore.alpha": str(alpha),
            "diffcore.architecture": model.architecture,
            "diffcore.base_model": model.base_model,
            "diffcore.config": json.dumps(attrs.asdict(cfg), sort_keys=True),
            # kohya's training keys, which ComfyUI and sd-scripts tools show
            "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(alpha),
            "ss_network_module": "networks.lora" if self.kind == "lora" else "lycoris.kohya",
        }
        if fmt == "peft":
            meta.update(formats.peft_metadata(self.targets, self.branches))
        meta.update({str(k): str(v) for k, v in (extra or {}).items()})
        return meta

    def save(
        self, path: str | Path, fmt: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write the adapter as safetensors in ``fmt`` (default: the config's ``save_format``), with
        base model, architecture, rank, alpha and diffcore version in the header."""
        fmt = fmt or self.config.save_format
        tensors = self.state_dict(fmt)
        save_safetensors(tensors, path, self.file_metadata(fmt, metadata))

    def load(self, path: str | Path) -> None:
        """Read a kohya or PEFT file (detected from its keys) into the attached branches."""
        self._require_attached("load")
        ckpt = Checkpoint(path)
        tensors = dict(ckpt.items())
        groups = formats.parse(tensors, ckpt.metadata, self.targets, where=str(path))
        missing = [t.kohya for t in self.targets if t.ident not in groups]
        if missing:
            raise UserError(
                f"the file has no tensors for {len(missing)} adapted layers (e.g. {', '.join(missing[:3])})",
                where=str(path),
                hint="was it saved from the same model with the same adapter targets?",
            )
        for target in self.targets:
            group = groups[target.ident]
            branch = self.branches[target.ident]
            if group.kind != branch.kind:
                raise UserError(
                    f"{target.kohya} holds a {group.kind} adapter; this adapter is {branch.kind}",
                    where=str(path),
                    hint=f"use adapter type {group.kind!r}",
                )
            branch.load_kohya(group.tensors, where=f"{path}: {target.kohya}")
            if group.alpha is not None:
                branch.set_alpha(group.alpha)

    # -- stacking saved files --------------------------------------------------------------------
    @classmethod
    def from_file(
        cls, model: Any, path: str | Path, strength: float = 1.0, *, name: str | None = None
    ) -> NetworkAdapter:
        """Attach the adapter saved at ``path`` (kohya, LyCORIS or PEFT format) to ``model`` for sampling.

        Layer kinds and ranks come from the file; its text-encoder parts go into ``model.frozen``.
        """
        ckpt = Checkpoint(path)
        tensors = dict(ckpt.items())
        components = components_of(model, True)
        pool = candidates(model, components, peft_override=_peft_prefix_of(ckpt.metadata))
        groups = formats.parse(tensors, ckpt.metadata, pool, where=str(path), strict=True)
        kinds = {g.kind for g in groups.values()}
        kind = "lora" if not kinds else (kinds.pop() if len(kinds) == 1 else "lora")
        ranks = [g.rank for g in groups.values()]
        config = _CONFIGS[kind](
            rank=max(ranks) if ranks else 1, name=name or Path(path).stem, strength=float(strength)
        )
        adapter = cls(config, kind=kind)
        adapter.model = model
        by_ident = {t.ident: t for t in pool}
        adapter.name = _free_name(adapter.name, [by_ident[i].layer for i in groups])
        for ident, group in groups.items():
            target = by_ident[ident]
            branch = formats.branch_for(group, target.layer)
            branch.load_kohya(group.tensors, where=f"{path}: {target.kohya}")
            branch.requires_grad_(False)
            adapter._add(target, branch)
        return adapter

    @staticmethod
    def apply_adapters(
        model: Any, files: Sequence[tuple[str | Path, float]], *, merge: bool = False
    ) -> list[NetworkAdapter]:
        """Stack saved adapter files on ``model``, each at its own strength: [(path, strength), ...].

        With ``merge`` the updates are folded into the weights (fastest sampling; ``unmerge`` undoes it).
        """
        adapters = []
        for path, strength in files:
            adapter = NetworkAdapter.from_file(model, path, strength)
            if merge:
                adapter.merge()
            adapters.append(adapter)
        return adapters

    def _require_attached(self, what: str) -> None:
        if self.model is None:
            raise UserError(f"adapter.{what}() needs an attached adapter", hint="call attach(model) first")


def _compile(patterns: Sequence[str], where: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UserError(f"bad regex {p!r}: {exc}", where=where) from None
    return out


def _clean_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "adapter"


def _free_name(name: str, layers: Sequence[nn.Module]) -> str:
    """``name``, or ``name_2``... when another adapter on these layers already uses it."""
    used = set()
    for layer in layers:
        used.update(getattr(layer, "adapters", {}).keys())
    base, i = _clean_name(name), 1
    name = base
    while name in used:
        i += 1
        name = f"{base}_{i}"
    return name


def _peft_prefix_of(metadata: Mapping[str, str]) -> str | None:
    return metadata.get("diffcore.peft_prefix") or None
