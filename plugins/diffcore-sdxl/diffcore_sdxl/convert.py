"""Key maps between the diffusers layout and the original (SGM/LDM) single-file layout.

UNet: diffusers names (which diffcore's UNet uses) <-> ``model.diffusion_model.*`` names, per
REFERENCE.md section 1. Text encoders: HF CLIP keys stay HF under their single-file prefix, except
OpenCLIP towers (SDXL's bigG, SD2's H), whose fused ``in_proj`` is split in thirds and whose
``text_projection`` is stored transposed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from diffcore_sdxl.config import UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: where each family keeps its text encoders in a single file, and whether that tower is OpenCLIP
TEXT_PREFIXES: dict[str, dict[str, tuple[str, bool]]] = {
    "sdxl": {
        "te1": ("conditioner.embedders.0.transformer.", False),
        "te2": ("conditioner.embedders.1.model.", True),
    },
    "sd15": {"te1": ("cond_stage_model.transformer.", False)},
    "sd21": {"te1": ("cond_stage_model.model.", True)},
}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}
_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, (_RESNET.get(head, head), tail)))


def unet_name_to_original(name: str, cfg: UNetConfig) -> str | None:
    """A diffusers UNet parameter or module path -> its original name (no ``model.diffusion_model.``);
    None for paths that have no single original counterpart (a whole level)."""
    for new, old in _TOP.items():
        if name == new or name.startswith(new + "."):
            rest = name[len(new) + 1 :]
            if new.startswith("mid_block.resnets"):
                rest = _resnet(rest) if rest else rest
            return old + ("." + rest if rest else "")
    m = _BLOCK.match(name)
    if m is None:
        return None
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    per = cfg.layers_per_block + 1
    if side == "down":
        if kind == "downsamplers":
            base = f"input_blocks.{1 + b * per + cfg.layers_per_block}.0"
            rest = "op" + rest[len("conv") :] if rest.startswith("conv") else rest
        else:
            base = f"input_blocks.{1 + b * per + j}.{0 if kind == 'resnets' else 1}"
    else:
        if kind == "upsamplers":
            has_attention = cfg.attention[cfg.levels - 1 - b]
            base = f"output_blocks.{b * per + cfg.layers_per_block}.{2 if has_attention else 1}"
        else:
            base = f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets" and rest:
        rest = _resnet(rest)
    return base + ("." + rest if rest else "")


def unet_to_original(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers-layout UNet state dict -> single-file keys (with ``model.diffusion_model.``)."""
    out = {}
    for key, value in state.items():
        name = unet_name_to_original(key, cfg)
        if name is None:
            raise KeyError(f"no original name for UNet key {key}")
        out[UNET_PREFIX + name] = value
    return out


def original_to_unet_names(keys: Iterable[str], cfg: UNetConfig) -> dict[str, str]:
    """original name (no prefix) -> diffusers name, for every diffusers key in ``keys``."""
    return {unet_name_to_original(k, cfg): k for k in keys}


# -- OpenCLIP text towers ------------------------------------------------------------------------
_OPENCLIP_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_to_hf(
    items: Iterable[tuple[str, torch.Tensor]], num_layers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenCLIP text-tower tensors (prefix removed) -> HF ``CLIPTextModel(WithProjection)`` tensors.

    The fused ``attn.in_proj_weight``/``_bias`` (no ``.weight`` suffix) is split into q, k, v.
    Layers from ``num_layers`` on are dropped: SD2 uses the penultimate of 24 layers, which the
    23-layer HF model reproduces. ``logit_scale`` and the causal-mask buffer have no HF counterpart.
    """
    for key, value in items:
        if key in _OPENCLIP_TOP:
            yield _OPENCLIP_TOP[key], value
        elif key == "text_projection":
            yield "text_projection.weight", value.t().contiguous()
        elif (m := _RESBLOCK.match(key)) is not None:
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if layer >= num_layers:
                continue
            base = f"text_model.encoder.layers.{layer}."
            yield base + _OPENCLIP_LAYER.get(module, module) + "." + leaf, value
        elif (m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)) is not None:
            layer, leaf = int(m.group(1)), m.group(2)
            if layer >= num_layers:
                continue
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                yield f"text_model.encoder.layers.{layer}.self_attn.{name}.{leaf}", part.contiguous()


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text-model tensors -> OpenCLIP text-tower keys (no prefix); q/k/v fused again."""
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer_map = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)) is not None:
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, leaf), {})[module[-6]] = value
            else:
                out[f"transformer.resblocks.{layer}.{layer_map[module]}.{leaf}"] = value
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    for (layer, leaf), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out
