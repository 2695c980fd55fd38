"""Comparing a model with a reference implementation on the same random weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def assert_outputs_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5, rtol: float = 0.0, what: str = "output"
) -> float:
    """Fail unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere; the message gives
    the shapes, the largest difference, where it is, the mean difference and how many elements
    fail. Returns the largest absolute difference."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        raise AssertionError(
            f"{what}: non-finite values ({int((~torch.isfinite(a)).sum())} in ours, "
            f"{int((~torch.isfinite(e)).sum())} in the reference)"
        )
    diff = (a - e).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: max abs diff {worst:.3g} at {index} (ours {float(a[index]):.6g}, reference "
            f"{float(e[index]):.6g}); mean abs diff {float(diff.mean()):.3g}; {int(bad.sum())} of {diff.numel()} "
            f"elements beyond atol={atol:g}, rtol={rtol:g}; reference magnitude {float(e.abs().max()):.3g}"
        )
    return worst


def _load(module: nn.Module, state: Mapping[str, torch.Tensor], who: str) -> None:
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:5])})")
        raise AssertionError(f"the state dict does not fit {who}: " + "; ".join(parts))


def compare_with_reference(
    ours: nn.Module,
    reference: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    to_ours: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
    run_ours: Callable[..., torch.Tensor] | None = None,
    run_reference: Callable[..., torch.Tensor] | None = None,
    atol: float = 1e-5,
    rtol: float = 0.0,
) -> float:
    """Load the same weights into ``ours`` and ``reference``, run both on ``args``/``kwargs`` and
    :func:`assert_outputs_close`. Returns the largest absolute difference.

    The weights are ``state_dict`` in the reference's layout (loaded into both), else the
    reference's own random init; ``to_ours`` converts them to our layout (a key-map, say) first.
    Loading is strict: a missing or unexpected key fails with examples. ``run_ours(module, *args,
    **kwargs)`` / ``run_reference(...)`` call a module and return its output tensor (default: call it,
    and take the first element of a tuple). Both run in eval mode without gradients.
    """
    kwargs = dict(kwargs or {})
    state = {k: v.detach().clone() for k, v in (state_dict or reference.state_dict()).items()}
    if state_dict is not None:
        _load(reference, state, "the reference")
    _load(ours, to_ours(dict(state)) if to_ours is not None else state, "our model")
    ours.eval()
    reference.eval()
    with torch.no_grad():
        out = (run_ours or _call)(ours, *args, **kwargs)
        ref = (run_reference or _call)(reference, *args, **kwargs)
    return assert_outputs_close(out, ref, atol=atol, rtol=rtol, what=f"{type(ours).__name__} vs {type(reference).__name__}")


def _call(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = module(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(module).__name__} returned {type(out).__name__}; pass run_ours/run_reference to pick the tensor")
    return out
