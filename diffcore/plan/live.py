"""Peak live memory of a forward and backward run on the meta device.

Every tensor an operator creates is counted from its creation until its storage is freed, so the peak
covers what autograd saves, the transient buffers of each operator, recomputation under activation
checkpointing and the gradients, without allocating anything. Attention is counted as the fused
kernels (flash, memory-efficient; also torch's CPU flash kernel) keep it: the output and one float
per query and head, never the attention matrix that the meta device's fallback would build.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_HOST_READS = {
    torch.ops.aten._local_scalar_dense.default: lambda t: (
        1.0 if t.dtype.is_floating_point else (True if t.dtype == torch.bool else 1)
    ),
    torch.ops.aten.equal.default: lambda t: True,
    torch.ops.aten.is_nonzero.default: lambda t: True,
}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created while it is active (tensors made before are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _HOST_READS and any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
            # a value read back to the host (a range check, a finite check): meta tensors hold none,
            # and 1 (True) passes the checks models make on their inputs
            return _HOST_READS[func](args[0])
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "meta":
            target = (kwargs or {}).get("device")
            if target is not None and torch.device(target).type != "meta":
                # read back to the host (an index into a table on the CPU): ones, as above
                dtype = (kwargs or {}).get("dtype") or args[0].dtype
                return torch.ones(args[0].shape, dtype=dtype, device=target)
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: that memory exists already
        inputs = {
            id(v.untyped_storage()) for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and id(value.untyped_storage()) not in inputs:
                self._track(value)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # torch keeps a storage's Python object alive as long as the storage itself: its finaliser
        # runs when the memory would be given back
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention with the memory of the fused kernels."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    if kwargs.get("enable_gqa"):
        raise NotImplementedError("grouped-query attention is not modelled")
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Inside: ``F.scaled_dot_product_attention`` allocates as the fused kernels do."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
