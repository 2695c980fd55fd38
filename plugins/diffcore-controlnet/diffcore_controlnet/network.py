"""The ControlNet: the model's trunk copy, the control image's embedding and the zero projections.

Module names follow diffusers where the trunk does not decide them: ``ConditioningEmbedding`` is
ControlNetModel's ``controlnet_cond_embedding`` (``conv_in``, ``blocks.i``, ``conv_out``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.control import ControlTrunk

TRUNK, HINT, ZERO = "trunk.", "hint.", "zero."


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConditioningEmbedding(nn.Module):
    """The control image (pixels in [0, 1]) down to the latent grid: a conv, then per stage a conv and
    a stride-2 conv, all with SiLU, and a zero-initialised conv out to the trunk's width."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _zeroed(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
        self.downscale = 2 ** (len(widths) - 1)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """``forward(noisy, t, cond, control, scale, **extra)`` -> the residual keywords of the model's
    ``predict``. ``control`` is already prepared: pixels in [0, 1] at ``downscale`` times the latent
    grid (UNet family) or the control image's latents (Flux)."""

    def __init__(self, trunk: ControlTrunk, embedding_widths: Sequence[int], control_channels: int = 3):
        super().__init__()
        self.trunk = trunk
        self.embedding_widths = list(embedding_widths)
        self.hint: nn.Module
        if trunk.hint_input == "pixels":
            self.hint = ConditioningEmbedding(control_channels, self.embedding_widths, trunk.hint_channels)
        else:
            self.hint = _zeroed(nn.Linear(trunk.hint_features, trunk.hint_channels))
        grid = trunk.feature_layout == "grid"
        self.zero = nn.ModuleList(
            _zeroed(nn.Conv2d(c, c, 1) if grid else nn.Linear(c, c)) for c in trunk.feature_channels
        )

    @property
    def downscale(self) -> int:
        """Control pixels per latent position along a side (UNet family); 1 for latent hints."""
        return self.hint.downscale if isinstance(self.hint, ConditioningEmbedding) else 1

    def forward(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        control: torch.Tensor,
        scale: float = 1.0,
        **extra: Any,
    ) -> dict[str, Any]:
        dtype = next(self.hint.parameters()).dtype
        hint = self.hint(self.trunk.hint_tokens(control.to(dtype)))
        features = self.trunk(noisy_latents, t, cond, hint, **extra)
        return self.trunk.residuals([proj(f) * scale for proj, f in zip(self.zero, features)])

    # -- the published layout --------------------------------------------------------------------
    def diffusers_config(self) -> dict[str, Any]:
        config = self.trunk.diffusers_config()
        if isinstance(self.hint, ConditioningEmbedding):
            config["conditioning_embedding_out_channels"] = list(self.embedding_widths)
            config["controlnet_conditioning_channel_order"] = "rgb"
            config["global_pool_conditions"] = False
        return config

    def diffusers_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict (``state``) under the published ControlNet class's keys."""
        names = self.trunk.feature_names
        trunk = {k[len(TRUNK) :]: v for k, v in state.items() if k.startswith(TRUNK)}
        out = self.trunk.to_diffusers(trunk)
        for key, value in state.items():
            if key.startswith(HINT):
                out[f"{self.trunk.hint_name}.{key[len(HINT):]}"] = value
            elif key.startswith(ZERO):
                index, _, param = key[len(ZERO) :].partition(".")
                out[f"{names[int(index)]}.{param}"] = value
        return out

    def from_diffusers(self, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`diffusers_state`: published tensors by this module's names."""
        names = {name: i for i, name in enumerate(self.trunk.feature_names)}
        hint = self.trunk.hint_name + "."
        trunk: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            module, _, param = key.rpartition(".")
            if key.startswith(hint):
                out[HINT + key[len(hint) :]] = value
            elif module in names:
                out[f"{ZERO}{names[module]}.{param}"] = value
            else:
                trunk[key] = value
        out.update({TRUNK + k: v for k, v in self.trunk.from_diffusers(trunk, where).items()})
        return out
