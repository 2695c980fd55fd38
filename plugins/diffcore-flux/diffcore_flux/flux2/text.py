"""Flux.2's text conditioning: one decoder LLM's hidden states of three layers, stacked along features.

dev reads Mistral-Small 3.x (layers 10, 20, 30, BFL's system message), klein Qwen3 (layers 9, 18,
27, thinking off), each through its chat template padded to 512 tokens, exactly as diffusers'
Flux2Pipeline / Flux2KleinPipeline ``encode_prompt`` do (the kernel's diffcore.text_encoders specs).
Weights come from a diffusers ``text_encoder/`` folder or a single safetensors file (ComfyUI's
``qwen_3_4b.safetensors`` / ``mistral_3_small.safetensors``, sizes read from the shapes); the
tokenizer from a folder. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders import MistralConfig, Qwen3Config, TextEncoder, load_text_encoder


class Flux2Text:
    """The frozen LLM encoder; ``encode(captions)`` -> (B, L, len(layers) * hidden) states."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def width(self) -> int:
        return len(self.encoder.config.layers) * int(self.model.config.hidden_size)

    def encode(self, captions: list[str]) -> torch.Tensor:
        # No no_grad here: the kernel's encoder keeps a graph only when the LLM has trainable
        # parameters (a text-encoder adapter), and runs without one otherwise. Padded to max_length and attended with the padding mask inside the LLM; the transformer
        # then sees every position (the pipelines pass no text mask to it either).
        return self.encoder.encode(captions).hidden


def load_text(
    path: str | Path | None,
    tokenizer: str | Path | None,
    *,
    dev: bool,
    layers: list[int] | None,
    max_length: int,
    dtype: torch.dtype,
    options: dict[str, Any],
    subfolder: str | None = None,
) -> Flux2Text:
    """Mistral (dev) or Qwen3 (klein) through diffcore.text_encoders, streamed in ``dtype``."""
    if path is None:
        raise UserError(
            "no text encoder given",
            where="$.model.text_encoder",
            hint="set text_encoder (a folder or a .safetensors file), or pretrained to a diffusers Flux.2 folder",
        )
    family, config_class = ("mistral", MistralConfig) if dev else ("qwen3", Qwen3Config)
    fields: dict[str, Any] = dict(
        pretrained=str(path),
        subfolder=subfolder,
        tokenizer=None if tokenizer is None else str(tokenizer),
        dtype=str(dtype).removeprefix("torch."),
        max_length=max_length,
        options=dict(options),
    )
    if layers is not None:
        fields["layers"] = tuple(layers)
    return Flux2Text(load_text_encoder(family, config_class(**fields)))
