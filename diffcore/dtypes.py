"""Precision names used in job files, and the torch dtypes they stand for.

Jobs and plugin configs spell a precision as ``float32``/``fp32``, ``bfloat16``/``bf16`` or
``float16``/``fp16``. :data:`NAMES` lists the accepted spellings (for attrs validators, which must not
import torch) and :func:`torch_dtype` turns one into a ``torch.dtype``; :func:`canonical` gives the
long form that files and ``config.json`` record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffcore.errors import UserError

if TYPE_CHECKING:
    import torch

#: every accepted spelling -> its canonical (torch attribute) name
_CANONICAL = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
#: the accepted precision names, long forms first
NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def canonical(name: str, where: str = "dtype") -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for any accepted spelling of ``name``."""
    key = str(name).removeprefix("torch.")
    if key not in _CANONICAL:
        raise UserError(f"unknown dtype {name!r}", where=where, hint=f"use one of {', '.join(NAMES)}")
    return _CANONICAL[key]


def torch_dtype(name: str, where: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` for a precision name (``"bf16"`` -> ``torch.bfloat16``); a UserError
    naming ``where`` for an unknown name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        canonical(name, where)
    ]
