"""The ``controlnet`` method's section (torch-free: plugin discovery imports it)."""

from __future__ import annotations

import attrs

from diffcore.methods.config import DiffusionMethodConfig


@attrs.define(kw_only=True)
class ControlNetConfig(DiffusionMethodConfig):
    """Train a ControlNet beside the frozen model on the dataset's ``control`` images.

    The ControlNet starts as a copy of the backbone's front with its zero projections at zero (so at
    step 0 the model predicts exactly what it predicts alone), or from ``pretrained``."""

    #: a diffusers ControlNet folder (config.json + safetensors) to start from instead of the backbone
    pretrained: str | None = None
    #: multiplies the ControlNet's residuals, in training and at inference
    conditioning_scale: float = 1.0
    #: share of training examples whose control image is blanked (black), so the ControlNet also
    #: learns to leave the model alone without a control signal
    control_dropout: float = 0.0
    #: Flux: double / single blocks copied into the ControlNet (diffusers' from_transformer: 4 and 10)
    num_layers: int | None = None
    num_single_layers: int | None = None
    #: UNet family: widths of the conv stack that brings the control image down to the latent grid
    #: (one stride-2 stage per entry after the first; diffusers' default, 8x down)
    conditioning_embedding_out_channels: list[int] = attrs.field(factory=lambda: [16, 32, 96, 256])
    #: also write the single file ComfyUI loads where its keys differ from the diffusers folder's
    #: (SD1.x/2.x: the original ``control_model.*`` layout)
    single_file: bool = True
