"""The OpenCLIP text-tower layout (SDXL's bigG, SD2's H in original single files) <-> transformers CLIP.

OpenCLIP fuses q, k, v into ``attn.in_proj_weight``/``_bias`` (split in thirds here), stores
``text_projection`` transposed, and keeps ``logit_scale`` and a causal-mask buffer that the HF model
does not have.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def is_openclip(keys: Iterable[str]) -> bool:
    """Whether tower keys (prefix removed) are in the OpenCLIP layout."""
    return any(k.startswith("transformer.resblocks.") for k in keys)


def openclip_layers(keys: Iterable[str]) -> int:
    return len({m.group(1) for k in keys if (m := _BLOCK.match(k)) is not None})


def openclip_to_hf(
    items: Iterable[tuple[str, torch.Tensor]], num_layers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenCLIP tensors -> HF ``text_model.*`` / ``text_projection.weight`` tensors. Blocks from
    ``num_layers`` on are dropped (SD2 conditions on the penultimate of 24 layers, which a 23-layer
    HF tower reproduces)."""
    for key, value in items:
        if key in _TOP:
            yield _TOP[key], value
        elif key == "text_projection":
            yield "text_projection.weight", value.t().contiguous()
        elif (m := _BLOCK.match(key)) is not None:
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= num_layers:
                continue
            base = f"text_model.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                leaf = rest.removeprefix("attn.in_proj_")
                for name, part in zip(_QKV, value.chunk(3, dim=0)):
                    yield f"{base}self_attn.{name}.{leaf}", part.contiguous()
            else:
                module, _, leaf = rest.rpartition(".")
                yield base + _LAYER.get(module, module) + "." + leaf, value
        # logit_scale and attn_mask have no HF counterpart


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text tensors (``text_model.*`` names) -> OpenCLIP keys, q/k/v fused again."""
    top = {v: k for k, v in _TOP.items()}
    layer_names = {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif (m := _HF_BLOCK.match(key)) is not None:
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if module.removeprefix("self_attn.") in _QKV:
                fused.setdefault((layer, leaf), {})[module.removeprefix("self_attn.")] = value
            else:
                out[f"transformer.resblocks.{layer}.{layer_names[module]}.{leaf}"] = value
        elif not key.endswith("position_ids"):
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    for (layer, leaf), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[n] for n in _QKV])
    return out
