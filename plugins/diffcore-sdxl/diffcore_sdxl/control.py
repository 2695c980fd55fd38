"""The ControlNet trunk of the UNet family: a copy of the UNet's down half (diffusers ControlNetModel)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from diffcore.control import ControlTrunk
from diffcore.errors import UserError
from diffcore_sdxl.network import Encoder, UNet

#: ControlNetModel config keys that must agree with the UNet the trunk is copied from
_SHAPE_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "in_channels")


class UNetTrunk(ControlTrunk, Encoder):
    """conv_in, the time (and SDXL size) embeddings, the down levels and the mid block, copied from
    the UNet under diffusers' names; features are the skips in push order, then the mid output."""

    hint_input = "pixels"
    feature_layout = "grid"
    hint_name = "controlnet_cond_embedding"

    def __init__(self, unet: UNet):
        super().__init__()
        self.config = unet.config
        self.gradient_checkpointing = unet.gradient_checkpointing
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        if self.config.addition_time_embed_dim is not None:
            self.add_embedding = copy.deepcopy(unet.add_embedding)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        self.requires_grad_(True)
        skips = self._skip_channels()
        self.hint_channels = self.config.block_out_channels[0]
        self.feature_channels = (*skips, self.config.block_out_channels[-1])
        self.feature_names = (*(f"controlnet_down_blocks.{i}" for i in range(len(skips))), "controlnet_mid_block")

    def forward(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        hint: torch.Tensor,
        **extra: Any,
    ) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        x = noisy_latents.to(dtype)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        pooled, time_ids = cond.get("pooled"), cond.get("time_ids")
        emb = self._embed(
            x,
            t,
            None if pooled is None else pooled.to(x.device, dtype),
            None if time_ids is None else time_ids.to(x.device, dtype),
        )
        context = cond["context"].to(x.device, dtype)
        h, skips = self._down(self.conv_in(x) + hint.to(dtype), emb, context)
        return [*skips, self._mid(h, emb, context)]

    def residuals(self, features: list[torch.Tensor]) -> dict[str, Any]:
        return {"down_block_residuals": features[:-1], "mid_block_residual": features[-1]}

    def diffusers_config(self) -> dict[str, Any]:
        unet = self.config.to_diffusers()
        for key in ("sample_size", "out_channels", "up_block_types"):
            unet.pop(key)
        return {**unet, "_class_name": "ControlNetModel", "conditioning_channels": 3}


def unet_trunk(unet: UNet, options: Mapping[str, Any]) -> UNetTrunk:
    """The trunk of ``unet``; ``options`` (a saved ControlNetModel config) must describe the same UNet."""
    trunk = UNetTrunk(unet)
    mine = trunk.diffusers_config()
    for key in _SHAPE_KEYS:
        if key in options and _plain(options[key]) != _plain(mine[key]):
            raise UserError(
                f"this ControlNet was made for another UNet: {key} is {options[key]!r}, the model's is {mine[key]!r}",
                where="controlnet config.json",
                hint="use a ControlNet trained for this base model",
            )
    return trunk


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value

