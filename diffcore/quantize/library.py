"""The library adapters: one weight tensor in, its quantised form out (torchao for every mode).

Each mode is torchao's own tensor subclass, so an ``nn.Linear`` keeps its class, its state-dict names
and its ``F.linear`` call, and adapters wrap it as before:

- ``int8``: ``Int8Tensor`` (weight-only, one scale per output row), through ``quantize_`` with
  ``Int8WeightOnlyConfig``; runs on CPU and CUDA.
- ``fp8``: ``Float8Tensor`` (float8 e4m3 weight-only, one scale per output row), through ``quantize_``
  with ``Float8WeightOnlyConfig``; runs on CPU and CUDA (the matmul dequantises: it saves memory,
  not time).
- ``nf4``: ``NF4Tensor`` (4-bit NormalFloat in blocks of 64, scales double-quantised), through
  ``to_nf4``; its ``F.linear`` dequantises to the input's dtype; runs on CPU and CUDA.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.quantize.modes import library_for

# NF4 quantises blocks of this many values; their absmax scales are quantised again in groups of
# up to this many blocks (torchao's defaults)
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
# int8 and fp8 quantise a large weight this many values at a time (the library's temporaries are
# several float32 copies of what it is given)
CHUNK_ELEMENTS = 1 << 18


def require(mode: str, device: torch.device | str | None = None, *, where: str = "$.model.quantize") -> Any:
    """The library module that does ``mode``, imported; a :class:`UserError` (exit 2) naming the
    package to install, or the device needed, when it cannot run here."""
    lib = library_for(mode)
    try:
        # torchao logs a warning for each optional CUDA/CUTLASS extension a CPU wheel cannot load,
        # and torch one for an enum torchao registers: neither concerns the user
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        module = importlib.import_module(lib.module)
        importlib.import_module(f"{lib.module}.quantization")
    except ImportError as exc:
        raise UserError(
            f"{mode} needs {lib.module}, which is not installed or does not import ({exc})",
            where=where,
            hint=f"pip install '{lib.pip}' (it brings {lib.module}), or set model.quantize: none",
        ) from None
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in ("cpu", "cuda"):
        raise UserError(
            f"{mode} ({lib.module}) runs on CPU and CUDA devices, not on {kind!r}",
            where=where,
            hint="train on a CUDA GPU or the CPU, or set model.quantize: none",
        )
    return module


def eligible(mode: str, weight: torch.Tensor) -> bool:
    """Whether ``mode`` can hold this Linear weight: NF4 needs whole blocks of 64 values, and fp8
    no all-zero row (torchao 0.18 divides by the row's zero scale and stores NaN; a freshly
    zero-initialised modulation layer has such rows)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        return False
    if mode == "nf4":
        return weight.numel() % NF4_BLOCK == 0
    if mode == "fp8":
        return bool((weight.abs().amax(dim=1) > 0).all())
    return True


def quantize_weight(mode: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) in ``mode``'s quantised tensor type, same shape and nominal dtype."""
    weight = weight.detach()
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    if mode != "nf4" and weight.shape[0] > rows:
        # int8 and fp8 scale each output row on its own, so quantising a few rows at a time gives the
        # same tensor while the library's float32 temporaries stay the size of one chunk
        return _stack_rows([_quantize(mode, part) for part in weight.split(rows)])
    return _quantize(mode, weight)


def _stack_rows(parts: list[Any]) -> torch.Tensor:
    """Row chunks of one per-row quantised weight as one tensor of the same subclass, through the
    tensor-subclass protocol (``__tensor_flatten__`` / ``__tensor_unflatten__``): each inner tensor
    (data, per-row scales) has one row per weight row."""
    names, meta = parts[0].__tensor_flatten__()
    inner = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    return type(parts[0]).__tensor_unflatten__(inner, meta, torch.Size(shape), (shape[1], 1))


def _quantize(mode: str, weight: torch.Tensor) -> torch.Tensor:
    if mode == "nf4":
        from torchao.quantization import to_nf4

        blocks = weight.numel() // NF4_BLOCK
        return to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=math.gcd(blocks, NF4_SCALER_BLOCK))
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config: Any = (
        Int8WeightOnlyConfig(set_inductor_config=False)
        if mode == "int8"
        else Float8WeightOnlyConfig(set_inductor_config=False)
    )
    # quantize_ works on modules: a Linear shell on the meta device carries the one weight through it
    shell = nn.Linear(1, 1, bias=False, device="meta")
    shell.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(shell, config)
    quantized = shell.weight
    # quantize_ binds a new extra_repr to the module, a reference cycle that would keep this chunk
    # alive until the next garbage collection: break it so the chunk is freed as soon as it is copied
    shell.__dict__.pop("extra_repr", None)
    return quantized.data if isinstance(quantized, nn.Parameter) else quantized
