"""The ``sidenet`` method: the frozen model steered by a trained side network (a ControlNet in
miniature). Everything else (noise, times, targets, weighting) is :class:`DiffusionMethod`'s."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from diffcore import Problem, UserError
from diffcore.context import TrainContext
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.model import DiffusionModel
from diffcore_controlnet_example.model import ResidualModel
from diffcore_controlnet_example.network import SideNet
from diffcore_controlnet_example.plugin import RESIDUAL_MODELS, SideNetConfig

#: the module's name: its weights are exported as ``controlnet.safetensors``
MODULE = "controlnet"
#: the batch key of the control image (pixels in [-1, 1], BCHW)
CONTROL = "control"


class SideNetMethod(DiffusionMethod):
    inference_inputs = (CONTROL,)

    def __init__(self, config: SideNetConfig):
        super().__init__(config)
        self.config: SideNetConfig = config
        self.sidenet: SideNet | None = None

    def validate(self, job: Any) -> list[Problem]:
        if job.model.type not in RESIDUAL_MODELS:
            return [
                Problem(
                    "$.model.type",
                    f"the sidenet method feeds a residual to the model, and {job.model.type!r} takes none; "
                    f"use one of: {', '.join(RESIDUAL_MODELS)}",
                )
            ]
        return []

    def modules(self, model: DiffusionModel) -> dict[str, nn.Module]:
        if not isinstance(model, ResidualModel):
            raise UserError(
                f"the sidenet method needs a model that takes a residual, not {type(model).__name__}",
                where="$.model.type",
                hint=f"use one of: {', '.join(RESIDUAL_MODELS)}",
            )
        self.sidenet = SideNet(model.latent_channels, self.config.control_channels, self.config.width, model.residual_channels)
        return {MODULE: self.sidenet}

    def setup(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        # only the side network trains; the backbone must not even collect gradients
        ctx.model.backbone.requires_grad_(False)
        return []

    def predict(
        self,
        model: DiffusionModel,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        batch: Mapping[str, Any],
        **extra: Any,
    ) -> torch.Tensor:
        if self.sidenet is None:
            raise RuntimeError("SideNetMethod.modules(model) builds the side network before predict")
        if CONTROL not in batch:
            raise UserError("the batch has no control image", where=CONTROL, hint="give the dataset a control column")
        control = batch[CONTROL].to(noisy_latents.device)
        residual = self.sidenet(noisy_latents, control, t.to(noisy_latents.device).float())
        return model.predict(noisy_latents, t, cond, residual=residual, **extra)
