"""Turning a list of examples into a batch."""

from __future__ import annotations

from typing import Any


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (dicts of tensors, lists of tensors per position), turn ints into a tensor, keep strings
    as lists."""
    import torch

    out: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, dict):
            out[key] = collate(values)
        elif isinstance(first, list) and first and all(isinstance(v, torch.Tensor) for v in first):
            # several images per example (references): one batch tensor per position
            out[key] = [torch.stack([v[i] for v in values]) for i in range(len(first))]
        elif isinstance(first, bool) or not isinstance(first, int):
            out[key] = values
        else:
            out[key] = torch.tensor(values, dtype=torch.long)
    return out
