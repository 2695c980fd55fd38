"""Autoencoder configurations, one class per family, torch-free.

Architecture keys mirror diffusers' ``AutoencoderKL`` / ``AutoencoderKLFlux2`` config names, with
defaults of the published models, so a job (or a test building a tiny random model) sets the same keys
a diffusers ``vae/config.json`` holds. When ``pretrained`` is given, the architecture comes from the
checkpoint (its ``config.json``, or the tensor shapes of an original single file); ``norm_num_groups``
cannot be read from shapes and is taken from here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

Dtype = Literal["float32", "float16", "bfloat16"]


def _four_levels() -> list[int]:
    return [128, 256, 512, 512]


@attrs.frozen(kw_only=True)
class AutoencoderConfig:
    """Options every family shares: where the weights come from and how it runs."""

    #: a diffusers ``vae/`` folder, a pipeline folder, an original single file, or None (random init)
    pretrained: str | None = None
    #: weights dtype; float16 with ``force_upcast`` keeps float32 weights (see ``force_upcast``)
    dtype: Dtype = "float32"
    #: encode draws from the posterior instead of taking its mean
    sample: bool = False
    #: encode/decode images larger than ``tile_size`` pixels tile by tile with blended overlaps
    tiling: bool = False
    tile_size: int = 512
    tile_overlap: int = 64

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = attrs.field(factory=_four_levels)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


@attrs.frozen(kw_only=True)
class KLConfig(AutoencoderConfig):
    """The KL autoencoder (diffusers ``AutoencoderKL``); latents are ``(z - shift) * scale``."""

    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    #: the published SD/SDXL/SD3/Flux configs set it: their activations overflow float16 (the SDXL
    #: decoder's reach well past 65504), so a float16 request keeps float32 weights and compute
    force_upcast: bool = True


@attrs.frozen(kw_only=True)
class SDConfig(KLConfig):
    """SD1.x / SD2.x: 4 channels, scale 0.18215."""

    family: ClassVar[str] = "sd"


@attrs.frozen(kw_only=True)
class SDXLConfig(KLConfig):
    """SDXL: 4 channels, scale 0.13025."""

    family: ClassVar[str] = "sdxl"

    scaling_factor: float = 0.13025


@attrs.frozen(kw_only=True)
class SD3Config(KLConfig):
    """SD3 / SD3.5: 16 channels, no quant convs, scale 1.5305 and shift 0.0609."""

    family: ClassVar[str] = "sd3"

    latent_channels: int = 16
    scaling_factor: float = 1.5305
    shift_factor: float | None = 0.0609
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False


@attrs.frozen(kw_only=True)
class FluxConfig(KLConfig):
    """Flux.1: 16 channels, no quant convs, scale 0.3611 and shift 0.1159."""

    family: ClassVar[str] = "flux"

    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False


@attrs.frozen(kw_only=True)
class Flux2Config(AutoencoderConfig):
    """Flux.2 (diffusers ``AutoencoderKLFlux2``): 32 channels, patchified 2x2 to 128 and normalised
    with the batch-norm running statistics stored in the checkpoint."""

    family: ClassVar[str] = "flux2"

    latent_channels: int = 32
    decoder_block_out_channels: list[int] | None = None
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: list[int] = attrs.field(factory=lambda: [2, 2])
    #: Flux.2 runs in bfloat16; its published config has no upcast flag
    force_upcast: bool = False


FAMILIES: dict[str, type[AutoencoderConfig]] = {
    "sd": SDConfig,
    "sdxl": SDXLConfig,
    "sd3": SD3Config,
    "flux": FluxConfig,
    "flux2": Flux2Config,
}
