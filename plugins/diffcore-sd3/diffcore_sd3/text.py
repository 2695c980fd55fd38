"""SD3's text conditioning from CLIP-L, OpenCLIP bigG and (optionally) T5-XXL.

The sequence is the two CLIPs' penultimate states side by side, zero-padded to T5's width, followed by
T5's states; the pooled vector is both CLIPs' projected outputs side by side. Without T5 its part of
the sequence is zeros of the transformer's context width, ``max_sequence_length`` tokens long (as
StableDiffusion3Pipeline does when text_encoder_3 is absent). Encoders load through
diffcore.text_encoders (folders or single files, streamed in ``dtype``); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders import ClipConfig, OpenClipConfig, T5Config, TextEncoder, load_text_encoder


class SD3TextEncoders:
    """``encode(captions)`` -> (context (B, 2 * 77 or 77 + T5 tokens, context_dim), pooled (B, 768 + 1280))."""

    def __init__(
        self, clip_l: TextEncoder, clip_g: TextEncoder, t5: TextEncoder | None, *, context_dim: int, t5_length: int
    ):
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5
        self.context_dim = context_dim
        self.t5_length = t5_length

    def modules(self) -> dict[str, nn.Module]:
        """The frozen encoders by the names adapters use (te1 CLIP-L, te2 CLIP-G, te3 T5)."""
        out = {"te1": self.clip_l.model, "te2": self.clip_g.model}
        if self.t5 is not None:
            out["te3"] = self.t5.model
        return out

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # no blanket no_grad: each kernel encoder keeps a graph only when it has trainable parameters
        # (a text-encoder adapter), so frozen encoders cost what they did and adapted ones train
        first, second = self.clip_l.encode(captions), self.clip_g.encode(captions)
        assert first.pooled is not None and second.pooled is not None  # both built with projection
        dtype = first.hidden.dtype
        clip = torch.cat((first.hidden, second.hidden.to(dtype)), dim=-1)
        if self.t5 is not None:
            t5 = self.t5.encode(captions).hidden
        else:
            t5 = torch.zeros(len(captions), self.t5_length, self.context_dim, device=clip.device, dtype=dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        context = torch.cat((clip, t5.to(clip.dtype)), dim=-2)
        pooled = torch.cat((first.pooled, second.pooled.to(first.pooled.dtype)), dim=-1)
        return context, pooled


def _given(path: str | Path | None, what: str, option: str) -> str:
    if path is None:
        raise UserError(
            f"no {what} given",
            where=f"$.model.{option}",
            hint=f"set {option}, or pretrained to a diffusers SD3 folder or a single file that holds it",
        )
    return str(path)


def load_text_encoders(
    paths: dict[str, str | Path | None],
    *,
    context_dim: int,
    t5_length: int,
    clip_length: int,
    dtype: torch.dtype,
    prefix: dict[str, str | None] | None = None,
) -> SD3TextEncoders:
    """The three encoders from ``paths`` (keys text_encoder[_2, _3], tokenizer[_2, _3]; a missing
    text_encoder_3 means no T5). ``prefix``: key prefixes inside single files, by encoder option."""
    prefix = prefix or {}
    precision = str(dtype).removeprefix("torch.")
    clip_l = ClipConfig(
        pretrained=_given(paths.get("text_encoder"), "CLIP-L text encoder", "text_encoder"),
        tokenizer=_given(paths.get("tokenizer"), "CLIP-L tokenizer", "tokenizer"),
        prefix=prefix.get("text_encoder"),
        dtype=precision,
        layer="penultimate",
        projection=True,
        max_length=clip_length,
    )
    clip_g = OpenClipConfig(
        pretrained=_given(paths.get("text_encoder_2"), "CLIP-G text encoder", "text_encoder_2"),
        tokenizer=_given(paths.get("tokenizer_2"), "CLIP-G tokenizer", "tokenizer_2"),
        prefix=prefix.get("text_encoder_2"),
        dtype=precision,
        max_length=clip_length,
    )
    t5 = None
    if paths.get("text_encoder_3") is not None:
        config = T5Config(
            pretrained=str(paths["text_encoder_3"]),
            tokenizer=_given(paths.get("tokenizer_3"), "T5 tokenizer", "tokenizer_3"),
            prefix=prefix.get("text_encoder_3"),
            dtype=precision,
            max_length=t5_length,
        )
        t5 = load_text_encoder("t5", config)
        width = t5.model.config.d_model
        if width != context_dim:
            raise UserError(
                f"this T5 encoder is {width} wide but the transformer takes {context_dim}-wide text states",
                where="$.model.text_encoder_3",
                hint="point text_encoder_3 at T5-XXL (t5xxl_*.safetensors), or set t5: false",
            )
    encoders = SD3TextEncoders(
        load_text_encoder("clip-l", clip_l),
        load_text_encoder("openclip-bigg", clip_g),
        t5,
        context_dim=context_dim,
        t5_length=t5_length,
    )
    clip_width = encoders.clip_l.model.config.hidden_size + encoders.clip_g.model.config.hidden_size
    if clip_width > context_dim:
        raise UserError(
            f"the two CLIP encoders give {clip_width} features, more than the transformer's {context_dim}",
            where="$.model.text_encoder",
            hint="point text_encoder at CLIP-L and text_encoder_2 at CLIP-G (OpenCLIP bigG)",
        )
    return encoders
