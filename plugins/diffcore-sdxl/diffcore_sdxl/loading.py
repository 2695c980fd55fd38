"""Building the UNet and text encoders from a diffusers folder, an original single file, or nothing.

Modules are created on the meta device and filled tensor by tensor (diffcore.weights.load_into); a
random model (``pretrained`` None) is for tests and from-scratch experiments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.errors import UserError
from diffcore.weights import Checkpoint, empty_weights, load_into
from diffcore_sdxl.config import TEXT_PRESETS, UNET_PRESETS, SDConfig, UNetConfig
from diffcore_sdxl.convert import TEXT_PREFIXES, UNET_PREFIX, openclip_to_hf, original_to_unet_names
from diffcore_sdxl.network import UNet

#: safetensors metadata key: how many HF layers an SD2 single file's OpenCLIP tower maps to
SD2_LAYERS_KEY = "diffcore.sd2_text_layers"


def _evolve(cfg: UNetConfig, overrides: dict[str, Any], where: str) -> UNetConfig:
    fields = {f.name for f in attrs.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown UNet option(s) {unknown}", where=where, hint=f"known: {sorted(fields)}")
    return attrs.evolve(cfg, **overrides)


def preset_unet(family: str, overrides: dict[str, Any]) -> UNetConfig:
    return _evolve(UNetConfig(**UNET_PRESETS[family]), overrides, "$.model.unet")


def _heads(family: str, channels: tuple[int, ...]) -> tuple[int, ...]:
    # SD1 uses 8 heads at every level; SD2 and SDXL use 64-wide heads (diffusers keeps both as
    # "attention_head_dim" in config.json, which a single file does not carry)
    if family == "sd15":
        return (8,) * len(channels)
    return tuple(max(1, c // 64) for c in channels)


def infer_unet(
    ckpt: Checkpoint, family: str, overrides: dict[str, Any], pooled_dim: int | None
) -> UNetConfig:
    """The UNet shape of an original single file, from its tensor shapes."""
    p = UNET_PREFIX
    shape = lambda key: tuple(ckpt.get(p + key).shape)  # noqa: E731
    keys = [k[len(p) :] for k in ckpt.keys() if k.startswith(p)]
    inputs = {int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")}
    levels = 1 + len({k.split(".")[1] for k in keys if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k)})
    per = (max(inputs) + 1) // levels
    channels, attention, depth = [], [], []
    for b in range(levels):
        first = 1 + b * per
        channels.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        blocks = {
            int(m.group(1))
            for k in keys
            if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))
        }
        attention.append(bool(blocks))
        depth.append(len(blocks) or 1)
    proj = next(k for k in keys if k.endswith("proj_in.weight"))
    to_k = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    extra: dict[str, Any] = {}
    if "label_emb.0.0.weight" in [*keys]:
        width = shape("label_emb.0.0.weight")[1]
        extra = dict(addition_input_dim=width, addition_time_embed_dim=(width - (pooled_dim or 0)) // 6)
    cfg = UNetConfig(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=channels,
        attention=attention,
        layers_per_block=per - 1,
        transformer_layers=depth,
        heads=_heads(family, tuple(channels)),
        cross_attention_dim=shape(to_k)[1],
        linear_projection=len(shape(proj)) == 2,
        **extra,
    )
    return _evolve(cfg, overrides, "$.model.unet")


def load_unet(cfg: UNetConfig, source: Checkpoint | None, *, original: bool, where: str) -> UNet:
    if source is None:
        return UNet(cfg)
    with empty_weights():
        unet = UNet(cfg)
    if not original:
        return load_into(unet, source.items(), where=where)
    names = original_to_unet_names(unet.state_dict().keys(), cfg)
    return load_into(unet, source.items(UNET_PREFIX), where=where, rename=lambda k: names.get(k, k))


# -- text encoders -------------------------------------------------------------------------------
def _clip_config(kwargs: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    base = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextConfig(**{**base, **kwargs})


def _build_clip(config: Any, projection: bool, meta: bool) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    if not meta:
        return cls(config)
    with empty_weights():
        return cls(config)


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # position_ids is a non-persistent buffer: load_into leaves it zeroed, CLIP needs 0..L-1
    for name, buf in list(model.named_buffers()):
        if name.endswith("position_ids"):
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.position_ids = torch.arange(buf.shape[-1], device=buf.device).expand(1, -1).clone()
    return model.to(dtype).eval()


def clip_renamer(model: torch.nn.Module) -> Any:
    """Map published HF CLIP keys (``text_model.*``) onto ``model``, whichever way the installed
    transformers nests the text transformer (version 5's CLIPTextModel drops ``text_model.``)."""
    own = set(model.state_dict())

    def rename(key: str) -> str | None:
        if key.endswith("position_ids"):
            return None
        for candidate in (key, key.removeprefix("text_model."), "text_model." + key):
            if candidate in own:
                return candidate
        return key

    return rename


def canonical_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text model's tensors under the published key names (``text_model.*``, ``text_projection``)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value.detach()
    return out


def text_preset(family: str, slot: str) -> dict[str, Any]:
    if family == "sdxl":
        return TEXT_PRESETS["clip-l" if slot == "te1" else "openclip-bigg"]
    return TEXT_PRESETS["clip-l" if family == "sd15" else "openclip-h"]


def random_text_encoder(family: str, slot: str, overrides: dict[str, Any]) -> torch.nn.Module:
    config = _clip_config({**text_preset(family, slot), **overrides})
    return _finish(_build_clip(config, slot == "te2", meta=False), torch.float32)


def folder_text_encoder(
    folder: Path, slot: str, overrides: dict[str, Any], dtype: torch.dtype
) -> torch.nn.Module:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UserError("text encoder folder has no config.json", where=str(folder))
    config = _clip_config({**json.loads(config_file.read_text()), **overrides})
    model = _build_clip(config, slot == "te2", meta=True)
    load_into(model, Checkpoint(folder).items(), where=str(folder), dtype=dtype, rename=clip_renamer(model))
    return _finish(model, dtype)


def single_file_text_encoder(
    ckpt: Checkpoint, family: str, slot: str, overrides: dict[str, Any], dtype: torch.dtype
) -> torch.nn.Module:
    prefix, openclip = TEXT_PREFIXES[family][slot]
    keys = [k[len(prefix) :] for k in ckpt.keys() if k.startswith(prefix)]
    if not keys:
        raise UserError(
            f"no text encoder weights under {prefix!r}",
            where=str(ckpt.path),
            hint=f"is this a {family} checkpoint?",
        )
    if openclip:
        layers = len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")})
        if family == "sd21":
            # SD2 conditions on the penultimate layer; the HF tower omits the last one
            layers = int(ckpt.metadata.get(SD2_LAYERS_KEY, layers - 1))
        tok = tuple(ckpt.get(prefix + "token_embedding.weight").shape)
        shape = dict(
            vocab_size=tok[0],
            hidden_size=tok[1],
            max_position_embeddings=ckpt.get(prefix + "positional_embedding").shape[0],
            intermediate_size=ckpt.get(prefix + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
            num_hidden_layers=layers,
            hidden_act="gelu",
        )
        if prefix + "text_projection" in ckpt:
            shape["projection_dim"] = ckpt.get(prefix + "text_projection").shape[1]
        items = openclip_to_hf(ckpt.items(prefix), layers)
    else:
        # older SD1 files lack the ``text_model.`` level
        has_level = any(k.startswith("text_model.") for k in keys)
        lead = "" if has_level else "text_model."
        base = prefix + ("text_model." if has_level else "")
        inner = [k.removeprefix("text_model.") for k in keys]
        tok = tuple(ckpt.get(base + "embeddings.token_embedding.weight").shape)
        shape = dict(
            vocab_size=tok[0],
            hidden_size=tok[1],
            max_position_embeddings=ckpt.get(base + "embeddings.position_embedding.weight").shape[0],
            intermediate_size=ckpt.get(base + "encoder.layers.0.mlp.fc1.weight").shape[0],
            num_hidden_layers=len({k.split(".")[2] for k in inner if k.startswith("encoder.layers.")}),
            hidden_act="quick_gelu",
        )
        items = ((lead + k, v) for k, v in ckpt.items(prefix) if not k.endswith("position_ids"))
    shape["num_attention_heads"] = max(1, shape["hidden_size"] // 64)
    config = _clip_config({**text_preset(family, slot), **shape, **overrides})
    model = _build_clip(config, slot == "te2", meta=True)
    load_into(model, items, where=f"{ckpt.path} ({prefix}*)", dtype=dtype, rename=clip_renamer(model))
    return _finish(model, dtype)


def load_tokenizer(path: Path | str, pad_token: str | None = None) -> Any:
    from transformers import CLIPTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            "tokenizer folder not found", where=str(path), hint="point it at a CLIP tokenizer folder"
        )
    kwargs = {"pad_token": pad_token} if pad_token else {}
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a CLIP tokenizer: {exc}", where=str(path)) from None


def dtype_of(config: SDConfig) -> torch.dtype:
    return getattr(torch, config.dtype)
