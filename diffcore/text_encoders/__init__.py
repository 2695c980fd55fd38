"""Text encoders for plugins: CLIP-L, OpenCLIP bigG, T5 and decoder-only LLMs (Qwen3, Mistral).

Public API::

    from diffcore.text_encoders import ClipConfig, load_text_encoder
    te = load_text_encoder("clip-l", ClipConfig(pretrained="sdxl/", subfolder="text_encoder"))
    out = te.encode(["a cat"])          # Encoded(hidden, pooled, mask)

- families (registered as text encoders): ``clip-l``, ``openclip-bigg``, ``t5``, ``qwen3``, ``mistral``,
  with configs :class:`ClipConfig`, :class:`OpenClipConfig`, :class:`T5Config`, :class:`Qwen3Config`,
  :class:`MistralConfig` (all :class:`EncoderConfig`);
- :func:`load_text_encoder` (model + tokenizer), :func:`load_model` (model only),
  :func:`load_tokenizer`, :func:`locate_weights`;
- weights come from a diffusers pipeline folder (``subfolder``), a component folder (``config.json``
  + safetensors, sharded or not) or one ``.safetensors`` file (ComfyUI ``clip_l``/``t5xxl``, or the
  original SD/SDXL/SD3 single files under their known prefixes; sizes read from the tensor shapes);
  modules are built on the meta device and streamed in ``dtype``, never randomly initialised first;
- helpers: :func:`hidden_layer` (last / penultimate / index), :func:`stacked_states` (LLM layers
  concatenated along features), :func:`repair_position_ids`, :func:`canonical_clip_state`,
  :func:`grad_if_trainable` (autograd only through an encoder that trains),
  :func:`openclip_to_hf` / :func:`hf_to_openclip`.

Importing this package does not import torch (the registration records use the configs); the
loaders import it on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffcore.text_encoders.config import (
    CONFIGS,
    FAMILIES,
    ClipConfig,
    EncoderConfig,
    LLMConfig,
    MistralConfig,
    OpenClipConfig,
    Qwen3Config,
    T5Config,
)

if TYPE_CHECKING:
    from diffcore.text_encoders.clip import canonical_state as canonical_clip_state
    from diffcore.text_encoders.clip import hidden_layer, repair_position_ids
    from diffcore.text_encoders.encoder import Encoded, TextEncoder, grad_if_trainable
    from diffcore.text_encoders.llm import stacked_states
    from diffcore.text_encoders.loading import load_model, load_text_encoder, locate_weights
    from diffcore.text_encoders.openclip import hf_to_openclip, openclip_to_hf
    from diffcore.text_encoders.sources import load_tokenizer

__all__ = [
    "CONFIGS",
    "FAMILIES",
    "ClipConfig",
    "Encoded",
    "EncoderConfig",
    "LLMConfig",
    "MistralConfig",
    "OpenClipConfig",
    "Qwen3Config",
    "T5Config",
    "TextEncoder",
    "canonical_clip_state",
    "grad_if_trainable",
    "hf_to_openclip",
    "hidden_layer",
    "load_model",
    "load_text_encoder",
    "load_tokenizer",
    "locate_weights",
    "openclip_to_hf",
    "repair_position_ids",
    "stacked_states",
]

_LAZY = {
    "Encoded": ("encoder", "Encoded"),
    "TextEncoder": ("encoder", "TextEncoder"),
    "grad_if_trainable": ("encoder", "grad_if_trainable"),
    "canonical_clip_state": ("clip", "canonical_state"),
    "hidden_layer": ("clip", "hidden_layer"),
    "repair_position_ids": ("clip", "repair_position_ids"),
    "stacked_states": ("llm", "stacked_states"),
    "load_model": ("loading", "load_model"),
    "load_text_encoder": ("loading", "load_text_encoder"),
    "locate_weights": ("loading", "locate_weights"),
    "hf_to_openclip": ("openclip", "hf_to_openclip"),
    "openclip_to_hf": ("openclip", "openclip_to_hf"),
    "load_tokenizer": ("sources", "load_tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffcore.text_encoders' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"diffcore.text_encoders.{module}"), attr)
