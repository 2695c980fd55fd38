"""Where a layer's adapter tensors live in a saved file: kohya names and PEFT/diffusers names.

The model plugin names its backbone layers in the published layouts (``model.adapter_key(path,
layout)``); this plugin builds the file names on them: kohya "lora_unet_<original name with
underscores>"; PEFT "<diffusers component>.<diffusers path>", or for a fused layer a list of
(diffusers path, rows) whose lora_B rows it owns. Text encoders use kohya "lora_<te>_" over HF
module names and diffusers "<component>." prefixes, both named by the model
(``model.text_encoder_key(name, layout)``): Flux's T5 is kohya ``te3`` (as in sd-scripts and ComfyUI)
but diffusers ``text_encoder_2``. Files that older diffcore wrote under the frozen name itself
(``lora_te2_`` for Flux's T5) are still read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from torch import nn

from diffcore.model import DiffusionModel
from diffcore_lora.layers import supports

BACKBONE = "backbone"
#: kohya's prefix for backbone layers, whatever the architecture (UNet or transformer)
KOHYA_BACKBONE = "lora_unet_"


@attrs.define
class Target:
    """One adaptable layer: which component it is in, its dotted path there, and its file names."""

    component: str
    path: str
    layer: nn.Module
    kohya: str
    # (full PEFT module name with its component prefix, rows of lora_B it owns or None for all)
    peft: list[tuple[str, slice | None]]
    # other PEFT names read as this layer (never written): CLIP paths with and without ``text_model.``
    aliases: list[str] = attrs.field(factory=list)
    # other kohya names read as this layer (never written): older diffcore files' text-encoder names
    kohya_aliases: list[str] = attrs.field(factory=list)

    @property
    def ident(self) -> str:
        return f"{self.component}:{self.path}"


def _rows(spec: Any, start: int) -> slice:
    # A model may give rows as a slice, a (start, stop) pair, or a row count following the previous part.
    if isinstance(spec, slice):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return slice(int(spec[0]), int(spec[1]))
    return slice(start, start + int(spec))


def peft_prefix(model: DiffusionModel, override: str | None = None) -> str:
    """The diffusers component the backbone is saved under: "unet" or "transformer"."""
    return override or model.diffusers_component


def _backbone_names(
    model: DiffusionModel, path: str, prefix: str
) -> tuple[str | None, list[tuple[str, slice | None]]]:
    original = model.adapter_key(path, "original")
    kohya = None if original is None else KOHYA_BACKBONE + str(original).replace(".", "_")
    peft = model.adapter_key(path, "diffusers")
    if peft is None:
        parts: list[tuple[str, slice | None]] = []
    elif isinstance(peft, str):
        parts = [(f"{prefix}.{peft}", None)]
    else:
        parts, start = [], 0
        for name, rows in peft:
            sl = _rows(rows, start)
            parts.append((f"{prefix}.{name}", sl))
            start = sl.stop
    return kohya, parts


def candidates(model: Any, components: Iterable[str], *, peft_override: str | None = None) -> list[Target]:
    """Every adaptable layer of the named components ("backbone" and frozen text-encoder names)."""
    prefix = peft_prefix(model, peft_override)
    kohya_te = {name: model.text_encoder_key(name, "original") for name in model.frozen}
    taken = set(kohya_te.values())
    out: list[Target] = []
    for component in components:
        if component == BACKBONE:
            root = model.backbone
        else:
            root = model.frozen[component]
        for path, layer in root.named_modules():
            if not path or not supports(layer) or path.split(".")[-1] == "adapters":
                continue
            if ".adapters." in f".{path}.":  # never adapt an adapter's own parts
                continue
            if component == BACKBONE:
                kohya, peft = _backbone_names(model, path, prefix)
                if kohya is None:
                    continue
            else:
                # kohya files use the published names; PEFT files the module paths PEFT injects by
                published = _published_text_path(root, path)
                flat = published.replace(".", "_")
                kohya = f"lora_{kohya_te[component]}_{flat}"
                te_prefix = model.text_encoder_key(component, "diffusers")
                peft = [(f"{te_prefix}.{path}", None)]
                aliases = [f"{te_prefix}.{published}"] if published != path else []
                # older diffcore wrote the frozen name itself (lora_te2_ for Flux's T5): still read
                # it, unless that is another encoder's kohya name
                legacy = [f"lora_{component}_{flat}"] if component not in taken else []
                out.append(Target(component, path, layer, kohya, peft, aliases, legacy))
                continue
            out.append(Target(component, path, layer, kohya, peft))
    return out


def _published_text_path(encoder: nn.Module, path: str) -> str:
    # transformers 5 dropped the ``text_model.`` level from CLIPTextModel's module names; files (kohya,
    # diffusers) keep the published ``text_model.*`` names that CLIPTextModelWithProjection still has.
    if type(encoder).__name__.startswith("CLIPText") and not path.startswith(
        ("text_model.", "text_projection")
    ):
        return "text_model." + path
    return path


def components_of(model: Any, text_encoders: bool | list[str]) -> list[str]:
    frozen = list(model.frozen)
    if text_encoders is True:
        tes = frozen
    elif text_encoders:
        tes = list(text_encoders)
    else:
        tes = []
    return [BACKBONE, *tes]
