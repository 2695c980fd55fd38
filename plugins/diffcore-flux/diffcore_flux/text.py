"""Flux.1's text conditioning: T5 encoder states for the sequence, CLIP-L's pooled output for the vector.

diffcore.text_encoders loads both from local folders in the Hugging Face layout (a diffusers pipeline's
text_encoder/, text_encoder_2/) or from single safetensors files (ComfyUI's clip_l and t5xxl files),
whose sizes are read from the tensor shapes. Tokenizers come from local folders (tokenizer/,
tokenizer_2/). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders import ClipConfig, T5Config, TextEncoder, load_text_encoder


class FluxTextEncoders:
    """CLIP-L (pooled) and T5 (sequence) with their tokenizers; ``encode(captions)`` -> (txt, pooled)."""

    def __init__(self, clip: TextEncoder, t5: TextEncoder):
        self.clip_encoder = clip
        self.t5_encoder = t5

    @property
    def clip(self) -> nn.Module:
        return self.clip_encoder.model

    @property
    def t5(self) -> nn.Module:
        return self.t5_encoder.model

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Fixed-length padding without an attention mask, as BFL and diffusers encode Flux prompts.
        # Each encoder keeps its graph only when it trains (a text-encoder adapter): see
        # diffcore.text_encoders.grad_if_trainable; frozen ones still run without autograd.
        pooled = self.clip_encoder.encode(captions).pooled
        txt = self.t5_encoder.encode(captions).hidden
        return txt, pooled


def _given(path: str | Path | None, what: str, option: str) -> str:
    if path is None:
        raise UserError(
            f"no {what} given",
            where=f"$.model.{option}",
            hint=f"set {option}, or pretrained to a diffusers Flux folder",
        )
    return str(path)


def load_text_encoders(
    clip_path: str | Path | None,
    t5_path: str | Path | None,
    clip_tokenizer_path: str | Path | None,
    t5_tokenizer_path: str | Path | None,
    *,
    max_length: int,
    dtype: torch.dtype,
) -> FluxTextEncoders:
    """CLIP-L and T5 through diffcore.text_encoders: folders or single files, streamed in ``dtype``."""
    precision = str(dtype)
    clip = ClipConfig(
        pretrained=_given(clip_path, "text encoder (CLIPTextModel)", "text_encoder"),
        tokenizer=_given(clip_tokenizer_path, "tokenizer", "tokenizer"),
        dtype=precision,
    )
    t5 = T5Config(
        pretrained=_given(t5_path, "text encoder 2 (T5EncoderModel)", "text_encoder_2"),
        tokenizer=_given(t5_tokenizer_path, "tokenizer 2", "tokenizer_2"),
        dtype=precision,
        max_length=max_length,
    )
    return FluxTextEncoders(load_text_encoder("clip-l", clip), load_text_encoder("t5", t5))
