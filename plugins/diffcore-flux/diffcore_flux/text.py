"""Flux.1's text conditioning: T5 encoder states for the sequence, CLIP-L's pooled output for the vector.

Both encoders and their tokenizers come from local folders in the Hugging Face layout (a diffusers
pipeline's text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/); nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffcore.errors import UserError


class FluxTextEncoders:
    """CLIP-L (pooled) and T5 (sequence) with their tokenizers; ``encode(captions)`` -> (txt, pooled)."""

    def __init__(self, clip: nn.Module, t5: nn.Module, clip_tokenizer, t5_tokenizer, max_length: int):
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_len = min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings)
        clip_ids = self._ids(self.clip_tokenizer, captions, clip_len, self.clip)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._ids(self.t5_tokenizer, captions, self.max_length, self.t5)
        txt = self.t5(t5_ids, output_hidden_states=False)[0]
        return txt, pooled

    @staticmethod
    def _ids(tokenizer, captions: list[str], length: int, encoder: nn.Module) -> torch.Tensor:
        # Fixed-length padding without an attention mask, as BFL and diffusers encode Flux prompts.
        ids = tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(next(encoder.parameters()).device)


def _folder(path: str | Path | None, what: str, option: str, marker: str) -> Path:
    if path is None:
        raise UserError(
            f"no {what} given",
            where=f"$.model.{option}",
            hint=f"set {option}, or pretrained to a diffusers Flux folder",
        )
    folder = Path(path)
    if not (folder / marker).exists():
        raise UserError(
            f"{what} not found: expected a folder in the Hugging Face layout",
            where=str(folder),
            hint=f"point {option} at a local folder (e.g. the pipeline's {option}/); nothing is downloaded",
        )
    return folder


def load_text_encoders(
    clip_path: str | Path | None,
    t5_path: str | Path | None,
    clip_tokenizer_path: str | Path | None,
    t5_tokenizer_path: str | Path | None,
    *,
    max_length: int,
    dtype: torch.dtype,
) -> FluxTextEncoders:
    """Load CLIP-L and T5 from local folders (weights streamed from safetensors, no random init)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    def model(cls, path, option):
        folder = _folder(path, f"{option.replace('_', ' ')} ({cls.__name__})", option, "config.json")
        try:
            return cls.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
        except OSError as exc:
            raise UserError(f"cannot load {cls.__name__}: {exc}", where=str(folder)) from None

    def tokenizer(path, option):
        folder = _folder(path, option.replace("_", " "), option, "tokenizer_config.json")
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer: {exc}", where=str(folder)) from None

    return FluxTextEncoders(
        model(CLIPTextModel, clip_path, "text_encoder"),
        model(T5EncoderModel, t5_path, "text_encoder_2"),
        tokenizer(clip_tokenizer_path, "tokenizer"),
        tokenizer(t5_tokenizer_path, "tokenizer_2"),
        max_length,
    )
