"""What a model hands a ControlNet: a trainable copy of the front of its backbone.

A ControlNet runs a copy of the backbone's input projections and first blocks beside the frozen
backbone, adds an embedded control image after the input projection, and feeds the features it
collects back into the backbone as residuals through zero-initialised projections. The copy and the
way its features re-enter the backbone are architecture knowledge, so the model provides them
(:meth:`diffcore.model.DiffusionModel.control_trunk`); the embedding of the control image, the zero
projections, the conditioning scale and the file layouts belong to the method plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn


class ControlTrunk(nn.Module):
    """The trunk of a ControlNet; subclasses copy their backbone's modules and implement ``forward``.

    ``forward(noisy_latents, t, cond, hint, **extra)`` runs the copied blocks on what
    ``DiffusionModel.predict`` takes, with ``hint`` (the embedded control image, shaped like the
    input projection's output) added after the input projection, and returns one feature per
    residual site, in the order of ``feature_names``.
    """

    #: "pixels": the control image in [0, 1] at the image's size is embedded down to the latent grid
    #: by a strided conv stack (the UNet family); "latents": the control image is encoded with the
    #: model's autoencoder and ``hint_tokens`` arranges it for a linear embedding (Flux)
    hint_input: Literal["pixels", "latents"] = "pixels"
    #: channels (or token width) of the input projection's output, where the embedded hint is added
    hint_channels: int = 0
    #: for "latents": input width of the hint's linear embedding (packed latent channels)
    hint_features: int = 0
    #: "grid": features are (B, C, H, W), projected by 1x1 convolutions; "tokens": (B, N, C), by linears
    feature_layout: Literal["grid", "tokens"] = "grid"
    #: channels of each feature, in the order ``forward`` returns them
    feature_channels: tuple[int, ...] = ()
    #: each feature's zero projection as the published ControlNet names it (diffusers:
    #: ``controlnet_down_blocks.3``, ``controlnet_mid_block``, ``controlnet_blocks.0``)
    feature_names: tuple[str, ...] = ()
    #: the published name of the hint embedding (``controlnet_cond_embedding``, ``controlnet_x_embedder``)
    hint_name: str = "controlnet_cond_embedding"

    def hint_tokens(self, control: torch.Tensor) -> torch.Tensor:
        """The prepared control (pixels in [0, 1], or latents) as the hint embedding takes it."""
        return control

    def residuals(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """The projected features as keyword arguments of ``DiffusionModel.predict``."""
        raise NotImplementedError(f"{type(self).__name__} must implement residuals")

    def diffusers_config(self) -> dict[str, Any]:
        """The published ControlNet class's config.json for this trunk (``_class_name`` included),
        without the control embedding's own keys."""
        raise NotImplementedError(f"{type(self).__name__} must implement diffusers_config")

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trunk's state dict in the published ControlNet's key layout (default: the same names)."""
        return dict(state)

    def from_diffusers(self, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`to_diffusers`: published trunk tensors by this module's names."""
        return dict(tensors)
