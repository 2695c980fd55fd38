"""The method's and callbacks' own state in a checkpoint, without pickle.

Each owner's ``state_dict()`` is split: tensors go to ``<owner>.safetensors``, everything else to
``<owner>.json`` (so it must be JSON values). Owners are "method" and "callback-<i>" in the order the
job lists callbacks; resuming with a reordered callback list is refused rather than mixed up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from diffcore.errors import UserError
from diffcore.weights import save_safetensors


def _owners(method: Any, callbacks: Sequence[Any]) -> list[tuple[str, Any]]:
    return [("method", method)] + [(f"callback-{i}-{type(cb).__name__}", cb) for i, cb in enumerate(callbacks)]


def save_states(folder: Path, method: Any, callbacks: Sequence[Any]) -> None:
    for name, owner in _owners(method, callbacks):
        state = owner.state_dict()
        if not state:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if tensors:
            save_safetensors(tensors, folder / f"{name}.safetensors")
        try:
            text = json.dumps(rest, indent=2)
        except TypeError as exc:
            raise TypeError(f"{type(owner).__name__}.state_dict() must hold tensors and JSON values: {exc}") from None
        (folder / f"{name}.json").write_text(text)


def load_states(folder: Path, method: Any, callbacks: Sequence[Any]) -> None:
    for name, owner in _owners(method, callbacks):
        json_file, tensor_file = folder / f"{name}.json", folder / f"{name}.safetensors"
        if not json_file.is_file():
            if owner.state_dict():
                raise UserError(
                    f"the checkpoint holds no state for {name}",
                    where=str(folder.parent),
                    hint="resume with the job's original method and callback list",
                )
            continue
        state: dict[str, Any] = json.loads(json_file.read_text())
        if tensor_file.is_file():
            state.update(load_file(str(tensor_file)))
        owner.load_state_dict(state)
