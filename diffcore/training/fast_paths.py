"""The fast paths a run takes where they are safe, each behind its own ``train`` key (docs/speed.md).

- ``tf32`` (default on): float32 matmuls and convolutions on CUDA run on TF32 tensor cores.
- ``channels_last`` ("auto": on CUDA): convolutional backbones and method modules (UNets,
  ControlNets) store their 4-D weights NHWC, the layout cuDNN's fastest kernels use.
- ``sdpa_backends`` (default: torch's choice): the scaled-dot-product-attention kernels allowed.
- fused AdamW on CUDA, foreach AdamW elsewhere: the built-in ``adamw``'s ``fused: null`` (see
  :func:`adamw_kernels`).

Importing this module does not import torch (the job schema validates ``sdpa_backends`` with it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: ``train.sdpa_backends`` names -> torch.nn.attention.SDPBackend members
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def check_sdpa_backends(instance: Any, attribute: Any, value: list[str] | None) -> None:
    """attrs validator of ``train.sdpa_backends``: known names, at least one."""
    from diffcore.config.structure import ExpectedError

    if value is None:
        return
    if not value:
        raise ExpectedError(f"must name at least one backend ({', '.join(SDPA_BACKENDS)}) or be null for torch's choice")
    unknown = [name for name in value if name not in SDPA_BACKENDS]
    if unknown:
        raise ExpectedError(f"unknown backend {unknown[0]!r}; choose from {', '.join(SDPA_BACKENDS)}")


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (a float32 mantissa of 10 bits in the products; the
    sums stay float32). Nothing changes on other devices, where it does not apply."""
    import torch

    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def is_convolutional(module: torch.nn.Module) -> bool:
    """Whether ``module`` convolves: some Conv2d's kernel is larger than its stride. A patchify
    convolution (kernel = stride, as a DiT's or Flux's input) is a matmul in disguise and gains
    nothing from channels_last."""
    import torch

    return any(
        isinstance(m, torch.nn.Conv2d) and any(k > s for k, s in zip(m.kernel_size, m.stride)) for m in module.modules()
    )


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    return device.type == "cuda" if setting == "auto" else bool(setting)


def to_channels_last(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The convolutional ones of ``modules``, converted in place to channels_last; returns them."""
    import torch

    converted = []
    for module in modules:
        if is_convolutional(module):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (missing from torch's stub)
            converted.append(module)
    return converted


def prepare(train: Any, modules: Iterable[torch.nn.Module], device: torch.device) -> None:
    """Apply the job's fast paths before the optimizer and DeepSpeed see the modules: TF32, the
    channels_last layout of the convolutional ``modules`` (the backbone, the method's own), and a
    check that one of the allowed attention backends runs here."""
    set_tf32(train.tf32, device)
    if use_channels_last(train.channels_last, device):
        to_channels_last(modules)
    check_backends_run(train.sdpa_backends, device)


def _sdpa_members(names: list[str]) -> list[Any]:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, SDPA_BACKENDS[name]) for name in names]


@contextlib.contextmanager
def attention_backends(names: list[str] | None) -> Iterator[None]:
    """Only the ``names`` attention backends inside (torch's own choice when None)."""
    if names is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_members(names)):
        yield


def check_backends_run(names: list[str] | None, device: torch.device) -> None:
    """A UserError (exit 2) now, rather than at the first step, when none of ``names`` runs on this
    device (e.g. only ``efficient`` on a CPU)."""
    if names is None:
        return
    import torch

    from diffcore.errors import UserError

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
    try:
        with warnings.catch_warnings(), attention_backends(names):
            warnings.simplefilter("ignore")  # torch explains each backend it passed over
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        raise UserError(
            f"none of the attention backends {', '.join(names)} runs on {device.type}",
            where="$.train.sdpa_backends",
            hint="add math (runs everywhere) or set it to null for torch's own choice",
        ) from None


def adamw_kernels(params: Iterable[Any], fused: bool | None, foreach: bool | None) -> dict[str, bool | None]:
    """torch.optim.AdamW's ``fused``/``foreach`` for ``params``: with both None, fused when every
    parameter is a floating CUDA or CPU tensor (one kernel for the whole update: on a CPU too it is
    several times faster than the per-tensor and foreach paths, which run the update as many small
    ops), else foreach (one op per parameter group instead of per tensor); an explicit choice is kept."""
    if fused is not None or foreach is not None:
        return {"fused": fused, "foreach": foreach}
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]  # groups or tensors
    fusable = all(t.device.type in ("cuda", "cpu") and t.is_floating_point() for t in tensors)
    return {"fused": True, "foreach": None} if fusable else {"fused": None, "foreach": True}
