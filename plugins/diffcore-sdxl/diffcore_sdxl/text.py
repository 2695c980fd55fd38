"""CLIP prompt encoding: tokenization in 75-token windows and the hidden states each model uses.

A prompt longer than the encoder's 77 positions is cut into windows of 75 tokens; each window is
wrapped in BOS ... EOS, padded to 77, encoded on its own, and the windows' states are concatenated
along the sequence (the convention of the A1111/kohya trainers). A prompt of at most 75 tokens is
exactly one window, identical to the usual ``padding="max_length"`` tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from diffcore.text_encoders import hidden_layer

Layer = Literal["last", "penultimate"]


def tokenize_windows(tokenizer: Any, captions: Sequence[str], min_windows: int = 1) -> torch.Tensor:
    """``(B, W * 77)`` token ids; every caption gets the same number ``W`` of windows (empty windows
    pad the shorter ones), at least ``min_windows``."""
    length = tokenizer.model_max_length if tokenizer.model_max_length < 10_000 else 77
    body = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pieces = [tokenizer(c, add_special_tokens=False, truncation=False).input_ids for c in captions]
    windows = max([min_windows] + [max(1, -(-len(p) // body)) for p in pieces])
    rows = []
    for ids in pieces:
        row: list[int] = []
        for w in range(windows):
            chunk = ids[w * body : (w + 1) * body]
            row += [bos, *chunk, eos] + [pad] * (body - len(chunk))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def window_count(tokenizer: Any, captions: Sequence[str]) -> int:
    length = tokenizer.model_max_length if tokenizer.model_max_length < 10_000 else 77
    lengths = [len(tokenizer(c, add_special_tokens=False, truncation=False).input_ids) for c in captions]
    return max([1] + [-(-n // (length - 2)) for n in lengths])


def encode_windows(
    encoder: torch.nn.Module, ids: torch.Tensor, layer: Layer, window: int = 77
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``(B, W * 77, D)`` of a CLIP text model over windowed ids, and the projected
    pooled embedding of each caption's first window (``None`` for a model without a projection).

    ``layer`` "last" is the final-norm output (SD1, SD2's 23-layer HF tower); "penultimate" is the
    second-to-last layer without the final norm (SDXL)."""
    b = ids.shape[0]
    flat = ids.reshape(b * (ids.shape[1] // window), window).to(encoder.device)
    out = encoder(flat, output_hidden_states=layer == "penultimate")
    hidden = hidden_layer(out, layer)
    hidden = hidden.reshape(b, -1, hidden.shape[-1])
    pooled = getattr(out, "text_embeds", None)
    if pooled is not None:
        pooled = pooled.reshape(b, -1, pooled.shape[-1])[:, 0]
    return hidden, pooled
