"""The method contract: how a batch becomes a loss, what trains, and what the method owns.

A method plugin's factory returns a :class:`Method` (a subclass). The kernel calls every member below
directly; the defaults make a method that trains an attached adapter, or nothing of the model, plus
whatever modules it declares. docs/plugin-api.md describes the lifecycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffcore.context import TrainContext
    from diffcore.errors import Problem
    from diffcore.model import DiffusionModel

#: what ``loss`` returns beside the loss: values to log, averaged over the logging window like ``loss``
Logs = Mapping[str, "torch.Tensor | float"]


class Method:
    """Defaults for every member of the method contract."""

    #: extra inputs ``predict`` needs at inference, by batch key (``diffcore sample --input KEY=IMAGE``
    #: and the sample callback's ``inputs`` fill them with images in [-1, 1], BCHW)
    inference_inputs: tuple[str, ...] = ()

    def validate(self, job: Any) -> list[Problem]:
        """Problems across sections (e.g. a model that cannot take what the method feeds it),
        reported by ``diffcore validate`` and before training; each names a ``$.path``."""
        return []

    def modules(self, model: DiffusionModel) -> dict[str, nn.Module]:
        """The named trainable modules the method owns (a ControlNet, an embedding, a student head).

        Called once per run, for training and for ``diffcore sample``, after an adapter is attached.
        The kernel trains them under DeepSpeed with the model (clipping, ZeRO, mixed precision, rank
        averaging), checkpoints and resumes them, and exports each as ``<name>.safetensors``."""
        return {}

    def setup(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        """The model's parameters that train besides the method's modules: the adapter's when one
        is attached, else none (the model stays frozen)."""
        return list(ctx.adapter_params or [])

    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        """(scalar loss, values to log) for one micro-batch. Draw randomness from ``ctx.step_random``."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss")

    def predict(
        self,
        model: DiffusionModel,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        batch: Mapping[str, Any],
        **extra: Any,
    ) -> torch.Tensor:
        """The prediction at inference; ``batch`` carries ``inference_inputs``. Default: the model's."""
        return model.predict(noisy_latents, t, cond, **extra)

    def export(self, name: str, module: nn.Module, folder: Path, metadata: Mapping[str, str]) -> None:
        """Write module ``name`` in published layouts into ``folder`` (``final/`` or a checkpoint),
        beside the ``<name>.safetensors`` the kernel writes. Called on the main rank only, with the
        module's whole weights (gathered under ZeRO-3). Default: nothing more."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint besides module weights: tensors and JSON values (no pickle)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
