"""The Flux.1 ControlNet trunk: a copy of the transformer's input projections and first blocks
(diffusers FluxControlNetModel, ``from_transformer``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from diffcore.control import ControlTrunk
from diffcore.errors import UserError
from diffcore_flux import convert
from diffcore_flux.network import Blocks, FluxTransformer
from diffcore_flux.packing import image_ids, pack, text_ids

#: FluxControlNetModel.from_transformer's defaults
DEFAULT_LAYERS = 4
DEFAULT_SINGLE_LAYERS = 10


class FluxTrunk(ControlTrunk, Blocks):
    """``img_in``, the time/guidance/pooled embeddings, ``txt_in`` and the first ``num_layers`` double
    and ``num_single_layers`` single blocks; features are the image stream after each block."""

    hint_input = "latents"
    feature_layout = "tokens"
    hint_name = "controlnet_x_embedder"

    def __init__(self, transformer: FluxTransformer, layers: int, single_layers: int):
        super().__init__()
        self.shape = attrs.evolve(transformer.shape, depth=layers, depth_single=single_layers)
        self.gradient_checkpointing = transformer.gradient_checkpointing
        for name in ("img_in", "time_in", "vector_in", "guidance_in", "txt_in"):
            setattr(self, name, copy.deepcopy(getattr(transformer, name)))
        self.double_blocks = copy.deepcopy(transformer.double_blocks[:layers])
        self.single_blocks = copy.deepcopy(transformer.single_blocks[:single_layers])
        self.requires_grad_(True)
        dim = self.shape.hidden_size
        self.hint_channels = dim
        self.hint_features = self.shape.in_channels
        self.feature_channels = (dim,) * (layers + single_layers)
        self.feature_names = (
            *(f"controlnet_blocks.{i}" for i in range(layers)),
            *(f"controlnet_single_blocks.{i}" for i in range(single_layers)),
        )

    def hint_tokens(self, control: torch.Tensor) -> torch.Tensor:
        return pack(control)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        hint: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
        **extra: Any,
    ) -> list[torch.Tensor]:
        b, _, h, w = noisy_latents.shape
        device = noisy_latents.device
        txt = cond["txt"].to(device)
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)
        g = None
        if self.shape.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux ControlNet embeds guidance: pass guidance=")
            g = torch.as_tensor(guidance, device=device, dtype=torch.float32).reshape(-1).expand(b)
        return self.run_blocks(
            pack(noisy_latents),
            image_ids(h, w, device=device),
            txt,
            text_ids(txt.shape[1], device=device),
            t,
            cond["pooled"].to(device),
            g,
            hint,
        )

    def residuals(self, features: list[torch.Tensor]) -> dict[str, Any]:
        n = self.shape.depth
        return {"controlnet_block_samples": features[:n], "controlnet_single_block_samples": features[n:]}

    def diffusers_config(self) -> dict[str, Any]:
        config = convert.diffusers_config(self.shape)
        config.pop("out_channels")
        return {**config, "_class_name": "FluxControlNetModel"}

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert.to_diffusers(state.items(), self.shape.hidden_size)

    def from_diffusers(self, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        native = list(self.state_dict())
        return dict(convert.from_diffusers(tensors.items(), native, self.shape.hidden_size, where=where))


def flux_trunk(transformer: FluxTransformer, options: Mapping[str, Any]) -> FluxTrunk:
    """The trunk of ``transformer`` with ``options``' ``num_layers`` / ``num_single_layers`` blocks."""
    layers = int(options.get("num_layers", DEFAULT_LAYERS))
    single = int(options.get("num_single_layers", DEFAULT_SINGLE_LAYERS))
    shape = transformer.shape
    for key, have in (("num_layers", shape.depth), ("num_single_layers", shape.depth_single)):
        asked = int(options.get(key, 0))
        if not 0 <= asked <= have:
            raise UserError(
                f"{key} is {asked}, but the Flux transformer has {have} such blocks to copy",
                where=f"$.method.{key}",
                hint=f"use at most {have}",
            )
    hidden = int(options.get("num_attention_heads", shape.num_heads)) * int(
        options.get("attention_head_dim", shape.hidden_size // shape.num_heads)
    )
    if hidden != shape.hidden_size:
        raise UserError(
            f"this ControlNet is {hidden} wide, the Flux transformer {shape.hidden_size}",
            where="controlnet config.json",
            hint="use a ControlNet trained for this base model",
        )
    return FluxTrunk(transformer, min(layers, shape.depth), min(single, shape.depth_single))
