"""The new tokens' vectors and how a text encoder reads them.

The vectors are parameters of their own (one ``(num_vectors, dim)`` matrix per token table), never rows
of the encoder's embedding table: the optimizer, its weight decay, gradient clipping and DeepSpeed's
ZeRO see only them, so every existing row stays bit-identical. A :class:`Splice` hooked onto the
table's ``nn.Embedding`` looks the new ids up in those vectors and every other id in the table as
before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: the key of the vectors in a single-encoder embedding file (A1111, ComfyUI; SD1.x and SD2.x)
SINGLE_KEY = "emb_params"


class NewTokens(nn.Module):
    """The trained vectors, one parameter per token table, named as embedding files name them
    (``emb_params`` for a single-encoder model, else ``clip_l``, ``clip_g``...): its state dict is
    the embedding file A1111/ComfyUI and diffusers' ``load_textual_inversion`` read."""

    def __init__(self, vectors: Mapping[str, torch.Tensor]):
        super().__init__()
        for key, value in vectors.items():
            self.register_parameter(key, nn.Parameter(value.detach().clone()))


class Splice(nn.Module):
    """Ids ``first_id .. first_id + n - 1`` of a token-embedding table read the vectors ``key`` of
    ``source`` instead.

    It is attached as a child of the ``nn.Embedding`` and registers the same parameter as
    :class:`NewTokens`, so the encoder counts as holding a trainable parameter and its forward keeps
    autograd (``diffcore.text_encoders.grad_if_trainable``); the table's own weight stays frozen. The
    lookup reads the parameter from ``source`` each time: loading weights into it (``diffcore
    sample``) may replace the parameter object."""

    def __init__(self, source: NewTokens, key: str, first_id: int, table: nn.Embedding):
        super().__init__()
        self.vectors = source.get_parameter(key)
        self.first_id = first_id
        self._source = (source, key)  # a tuple: not registered as a child module
        self._ids: torch.Tensor | None = None
        # new ids may lie past the table's end (real tokenizers fill it): the table sees them clamped
        self._handles = [table.register_forward_pre_hook(self._clamp), table.register_forward_hook(self._splice)]
        table.add_module("new_tokens", self)

    def _clamp(self, table: nn.Embedding, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        self._ids = ids
        return (ids.clamp(max=table.num_embeddings - 1), *args[1:])

    def _splice(self, table: nn.Embedding, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids, self._ids = self._ids, None
        assert ids is not None, "the pre-hook records the ids"
        source, key = self._source
        vectors = source.get_parameter(key)
        n = vectors.shape[0]
        offset = ids - self.first_id
        new = (offset >= 0) & (offset < n)
        picked = vectors[offset.clamp(0, n - 1)].to(device=output.device, dtype=output.dtype)
        return torch.where(new.unsqueeze(-1), picked, output)
