"""A loaded text encoder: the transformers model, its tokenizer, and ``encode(captions)``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders.config import EncoderConfig


@attrs.frozen(eq=False)
class Encoded:
    """What an encoder gives for a batch of captions.

    ``hidden``: ``(B, L, D)`` token states (for LLM encoders, several layers concatenated along D);
    ``pooled``: ``(B, P)`` or None for encoders without one; ``mask``: ``(B, L)``, 1 for real tokens.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor


def grad_if_trainable(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Autograd for a forward pass through ``module`` only when one of its parameters trains (an
    adapter on a text encoder, an unfrozen encoder); a frozen encoder builds no graph."""
    trains = any(p.requires_grad for p in module.parameters())
    return torch.set_grad_enabled(torch.is_grad_enabled() and trains)


class TextEncoder:
    """A text encoder with its tokenizer. Families subclass it with ``tokenize`` and ``run``.

    It is frozen unless something makes its parameters trainable (a text-encoder adapter): then
    ``encode`` keeps the graph so the conditioning carries gradients back into it."""

    family: str = ""

    def __init__(self, model: nn.Module, tokenizer: Any, config: EncoderConfig):
        # frozen until an adapter or a method unfreezes what trains: encode() then keeps the graph
        self.model = model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, L)``, on the model's device."""
        raise NotImplementedError

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        """Encode token ids (from :meth:`tokenize` or a cache)."""
        raise NotImplementedError

    def encode(self, captions: str | Sequence[str]) -> Encoded:
        if self.tokenizer is None:
            raise UserError(
                f"the {self.family} text encoder was loaded without a tokenizer", where="tokenizer"
            )
        ids, mask = self.tokenize([captions] if isinstance(captions, str) else list(captions))
        with grad_if_trainable(self.model):
            return self.run(ids, mask)

    def _padded(self, captions: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # fixed-length padding, as every reference pipeline encodes prompts for these models
        out = self.tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)
