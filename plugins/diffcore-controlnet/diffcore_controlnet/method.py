"""The ``controlnet`` method: the frozen model steered by a trained ControlNet.

Noise, times, targets and weighting are :class:`DiffusionMethod`'s; this method owns the ControlNet
(``modules``), feeds it the batch's ``control`` image in ``predict`` (training and inference alike),
blanks the control of a share of examples (``control_dropout``) and writes the published layouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcore import Problem, UserError
from diffcore.context import TrainContext
from diffcore.method import Logs
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.model import DiffusionModel
from diffcore.weights import load_into
from diffcore_controlnet import layouts
from diffcore_controlnet.config import ControlNetConfig
from diffcore_controlnet.network import ControlNet

#: the module's name: the kernel exports it as ``controlnet.safetensors``; the diffusers folder is
#: written beside it as ``controlnet/``
MODULE = "controlnet"
#: the batch key of the control image (pixels in [-1, 1], BCHW)
CONTROL = "control"


class ControlNetMethod(DiffusionMethod):
    inference_inputs = (CONTROL,)

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        self.config: ControlNetConfig = config
        self.net: ControlNet | None = None
        self.model: DiffusionModel | None = None

    # -- the job ----------------------------------------------------------------------------------
    def validate(self, job: Any) -> list[Problem]:
        c = self.config
        problems = []
        if not 0.0 <= c.control_dropout <= 1.0:
            problems.append(Problem("$.method.control_dropout", f"must be in [0, 1], got {c.control_dropout}"))
        if c.conditioning_scale < 0:
            problems.append(Problem("$.method.conditioning_scale", f"must be >= 0, got {c.conditioning_scale}"))
        if not c.conditioning_embedding_out_channels or min(c.conditioning_embedding_out_channels) < 1:
            problems.append(
                Problem("$.method.conditioning_embedding_out_channels", "give one or more positive widths")
            )
        for key in ("num_layers", "num_single_layers"):
            value = getattr(c, key)
            if value is not None and value < 0:
                problems.append(Problem(f"$.method.{key}", f"must be >= 0, got {value}"))
        if c.pretrained is not None and not (Path(c.pretrained) / layouts.CONFIG).is_file():
            problems.append(
                Problem("$.method.pretrained", f"{c.pretrained} is not a diffusers ControlNet folder (no config.json)")
            )
        return problems

    def modules(self, model: DiffusionModel) -> dict[str, nn.Module]:
        c = self.config
        where = "$.method.pretrained"
        tensors: dict[str, torch.Tensor] | None = None
        if c.pretrained is not None:
            options, tensors = layouts.read_folder(c.pretrained, where)
            widths = options.get("conditioning_embedding_out_channels", c.conditioning_embedding_out_channels)
            channels = int(options.get("conditioning_channels", 3))
        else:
            options = {k: getattr(c, k) for k in ("num_layers", "num_single_layers") if getattr(c, k) is not None}
            widths, channels = c.conditioning_embedding_out_channels, 3
        net = ControlNet(model.control_trunk(options), widths, channels).to(torch.float32)
        if tensors is not None:
            load_into(net, net.from_diffusers(tensors, c.pretrained or where), where=c.pretrained or where)
        self.net, self.model = net, model
        return {MODULE: net}

    def setup(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        # only the ControlNet trains; the backbone must not even collect gradients
        ctx.model.backbone.requires_grad_(False)
        return []

    # -- training ---------------------------------------------------------------------------------
    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        rate = self.config.control_dropout
        if rate > 0:
            assert ctx.step_random is not None, "the loop sets ctx.step_random before every micro-step"
            control = _control(batch)
            drop = (ctx.step_random.rand(control.shape[0]) < rate).to(control.device)
            blank = torch.full_like(control, -1.0)  # black: "no control" in [-1, 1]
            batch = {**batch, CONTROL: torch.where(drop.view(-1, 1, 1, 1), blank, control)}
        return self.denoising_loss(ctx, batch), {}

    def predict(
        self,
        model: DiffusionModel,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        batch: Mapping[str, Any],
        **extra: Any,
    ) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("ControlNetMethod.modules(model) builds the ControlNet before predict")
        control = self.prepare_control(model, _control(batch), noisy_latents)
        if model.guidance_embedded and extra.get("guidance") is None:
            extra = {**extra, "guidance": model.train_guidance}
        residuals = self.net(noisy_latents, t, cond, control, self.config.conditioning_scale, **extra)
        return model.predict(noisy_latents, t, cond, **residuals, **extra)

    def prepare_control(self, model: DiffusionModel, control: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The control image (pixels in [-1, 1]) as the ControlNet takes it: in [0, 1] at ``downscale``
        times the latent grid (diffusers' ControlNet pipelines feed [0, 1]), or encoded to latents."""
        assert self.net is not None
        control = control.to(latents.device, torch.float32)
        if self.net.trunk.hint_input == "latents":
            if model.autoencoder is None:
                raise UserError(
                    "this ControlNet takes the control image as latents, and the model has no autoencoder loaded",
                    where="$.model",
                    hint="load the model with its VAE (a complete latent cache leaves it out: train without data.cache_dir)",
                )
            size = tuple(s * model.latent_downscale for s in latents.shape[-2:])
            if tuple(control.shape[-2:]) != size:
                control = F.interpolate(control, size=size, mode="bilinear", align_corners=False)
            return model.encode_images(control.to(model.dtype)).float()
        size = tuple(s * self.net.downscale for s in latents.shape[-2:])
        if tuple(control.shape[-2:]) != size:
            control = F.interpolate(control, size=size, mode="bilinear", align_corners=False)
        return (control + 1) / 2

    # -- files ------------------------------------------------------------------------------------
    def export(self, name: str, module: nn.Module, folder: Path, metadata: Mapping[str, str]) -> None:
        if name != MODULE or not isinstance(module, ControlNet):
            return
        state = {k: v.detach() for k, v in module.state_dict().items()}
        layouts.save_folder(module, state, folder / MODULE, metadata)
        model = self.model
        if self.config.single_file and model is not None and model.architecture in layouts.ORIGINAL_FAMILIES:
            layouts.save_original(module, state, model, folder / f"{MODULE}-original.safetensors", metadata)


def _control(batch: Mapping[str, Any]) -> torch.Tensor:
    if CONTROL not in batch:
        raise UserError(
            "the batch has no control image: the controlnet method trains on the dataset's control column",
            where="$.data",
            hint="give the metadata dataset a control column (data.control_column names it), one control image per example",
        )
    return batch[CONTROL]
