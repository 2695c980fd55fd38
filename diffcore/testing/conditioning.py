"""A check for models with text encoders: an adapter on them trains, and frozen ones build no graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffcore.context import StepRandom
from diffcore.model import DiffusionModel


def _tensors(value: Any) -> list[torch.Tensor]:
    # the conditioning a model returns: a tensor, or a (nested) dict, list or tuple of them
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for key in sorted(value) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def assert_text_encoders_train(
    model: DiffusionModel,
    adapter: Any,
    batch: Mapping[str, Any],
    *,
    steps: int = 2,
    lr: float = 1e-2,
    seed: int = 0,
) -> None:
    """Train ``adapter`` (built with text encoders on, not yet attached) on ``model`` for ``steps``
    optimizer steps of the diffusion method, in process and without DeepSpeed, on ``batch``
    (``captions`` and ``latents`` or ``pixels``), and assert that:

    - the adapter put trainable parameters into every text encoder of ``model.frozen``;
    - each encoder's adapter parameters moved, and ``encode_conditions`` on the batch changed;
    - with those parameters frozen again, ``encode_conditions`` builds no graph (frozen encoders
      keep their inference cost).
    """
    from diffcore.testing.context import fake_context

    ctx = fake_context(model, adapter=adapter, seed=seed)
    assert model.frozen, f"{type(model).__name__} has no text encoders in model.frozen"
    per_encoder = {
        name: [p for p in module.parameters() if p.requires_grad] for name, module in model.frozen.items()
    }
    idle = [name for name, params in per_encoder.items() if not params]
    assert not idle, f"the adapter left no trainable parameters in text encoder(s) {idle}"
    trained = {id(p) for p in ctx.trainable}
    for name, params in per_encoder.items():
        assert all(id(p) in trained for p in params), f"{name}'s adapter parameters are not in ctx.trainable"
    before = {name: [p.detach().clone() for p in params] for name, params in per_encoder.items()}
    with torch.no_grad():
        cond_before = [t.detach().clone() for t in _tensors(model.encode_conditions(batch))]
    assert cond_before, "encode_conditions returned no tensors"

    optimizer = torch.optim.Adam(ctx.trainable, lr=lr)
    for step in range(steps):
        ctx.step_random = StepRandom(seed, step, 0, 1)
        loss, _ = ctx.method.loss(ctx, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, params in per_encoder.items():
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(params, before[name]))
        assert moved > 0, f"text encoder {name}'s adapter did not move in {steps} steps at lr {lr}"
    with torch.no_grad():
        cond_after = _tensors(model.encode_conditions(batch))
    change = max((a.float() - b.float()).abs().max().item() for a, b in zip(cond_after, cond_before))
    assert change > 0, "the trained text-encoder adapter left the conditioning unchanged"

    for params in per_encoder.values():
        for p in params:
            p.requires_grad_(False)
    try:
        graph = [t for t in _tensors(model.encode_conditions(batch)) if t.requires_grad]
        assert not graph, "frozen text encoders built an autograd graph in encode_conditions"
    finally:
        for params in per_encoder.values():
            for p in params:
                p.requires_grad_(True)
