"""The frozen teacher and the EMA target network, both as weights swapped into the one model.

No second copy of the model is built. With an adapter student the teacher is the base model with
the adapter switched off (strength 0); with a full student it is a snapshot of the weights that
train, taken before the first step. A ``teacher`` file is loaded into the model first (the student
starts from the teacher), or, with ``init_from_teacher: false``, swapped in for teacher calls only. The EMA target is an average of the trained parameters swapped in for target calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from diffcore.errors import UserError

WHERE = "$.method.teacher"


@runtime_checkable
class Switchable(Protocol):
    """An adapter that can be switched off for teacher calls (diffcore-lora's adapters)."""

    strength: float

    def set_strength(self, strength: float) -> None: ...


@contextlib.contextmanager
def swapped(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """``params`` hold ``values`` (cast to each parameter's dtype) inside the block, their own
    tensors again after it."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v.to(device=p.device, dtype=p.dtype)
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s


class Teacher:
    """Calls made inside :meth:`active` run the teacher."""

    def __init__(self, adapter: Switchable | None, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]):
        self.adapter = adapter
        self.params = list(params)
        self.values = list(values)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        strength = self.adapter.strength if self.adapter is not None else 0.0
        if self.adapter is not None:
            self.adapter.set_strength(0.0)
        try:
            with swapped(self.params, self.values), torch.no_grad():
                yield
        finally:
            if self.adapter is not None:
                self.adapter.set_strength(strength)


def build_teacher(
    model: Any, adapter: Any, trained: Sequence[nn.Parameter], path: str | None, init_from_teacher: bool = True
) -> Teacher:
    """The teacher of a student whose trainable parameters are ``trained``: see the module doc.
    ``init_from_teacher`` loads the ``path`` file into the model first (the student starts there)."""
    switch: Switchable | None = None
    if adapter is not None:
        if not isinstance(adapter, Switchable):
            raise UserError(
                f"the adapter {type(adapter).__name__} cannot be switched off for the teacher's calls",
                where="$.adapter",
                hint="use a diffcore-lora adapter (lora, dora, lokr, loha) or train the full model",
            )
        switch = adapter
    if path is not None:
        params, values = _from_file(model, Path(path), switch is not None)
        if not init_from_teacher:
            return Teacher(switch, params, values)
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
    if switch is not None:
        return Teacher(switch, [], [])
    # a full student: the weights that will train, as they are before the first step
    return Teacher(None, list(trained), [p.detach().clone() for p in trained])


def _from_file(model: Any, path: Path, has_adapter: bool) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The base weights the teacher file gives: by the backbone's own names, or else through the
    model's ``load_exported`` (a run's ``model.safetensors`` in the published layout)."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} not found", where=WHERE, hint="give a model.safetensors a run exported")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        arch = meta.get("diffcore.architecture")
        if arch and model.architecture and arch != model.architecture:
            raise UserError(
                f"teacher checkpoint {path} is a {arch!r} model, the student is {model.architecture!r}",
                where=WHERE,
                hint="distil from a checkpoint of the job's own model type",
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # an adapter's branches are not base weights (diffcore-lora keeps them under ".adapters.")
    base = [(n, p) for n, p in model.backbone.named_parameters() if ".adapters." not in f".{n}"]
    if all(n in tensors for n, _ in base):
        for name, p in base:
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise UserError(
                    f"teacher checkpoint {path}: {name} is {tuple(tensors[name].shape)}, the student's is {tuple(p.shape)}",
                    where=WHERE,
                    hint="the teacher must be the same architecture and size as the job's model",
                )
        return [p for _, p in base], [tensors[n].to(p.dtype) for n, p in base]
    if has_adapter:
        raise UserError(
            f"teacher checkpoint {path} does not name the backbone's weights as the model does",
            where=WHERE,
            hint="with an adapter student give the teacher in the backbone's own names, or train the full model",
        )
    # the published layout: load it through the model (which may put new parameter objects in
    # place), keep what it gave, then put the student's own parameters back
    try:
        model.load_exported(tensors, where=str(path))
        now = dict(model.backbone.named_parameters())
        values = [now[n].detach().clone() for n, _ in base]
    finally:
        for name, p in base:
            owner, _, leaf = name.rpartition(".")
            model.backbone.get_submodule(owner)._parameters[leaf] = p
    return [p for _, p in base], values


class EMATarget:
    """The target network: an exponential moving average of the trained parameters (decay 0: the
    online weights themselves), updated once per optimizer step, swapped in by :meth:`active`."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.values = [p.detach().float().clone() for p in self.params] if self.decay > 0 else []
        self.step = 0

    def update(self, step: int) -> None:
        """Fold in the current weights once per optimizer step (at the first micro-step after it),
        so a resumed run folds in exactly what a straight one does."""
        if step <= self.step:
            return
        self.step = step
        with torch.no_grad():
            for v, p in zip(self.values, self.params):
                v.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.no_grad():
            if not self.values:
                yield
                return
            with swapped(self.params, self.values):
                yield

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"target_step": self.step}
        state.update({f"target.{i}": v for i, v in enumerate(self.values)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["target_step"])
        for i, v in enumerate(self.values):
            v.copy_(state[f"target.{i}"])
