"""The autoencoder object latent architectures use (``diffcore.protocols.Autoencoder``).

Latent normalisation per family, in the order the reference pipelines apply it:
  KL families (sd, sdxl, sd3, flux): encode ``z = (mean_or_sample - shift) * scale`` (no shift for
  SD/SDXL); decode ``z / scale + shift``.
  flux2: encode takes the posterior mean (or a sample), patchifies 2x2 to 128 channels in (c, pi, pj)
  order, then ``(z - running_mean) / sqrt(running_var + eps)`` with the checkpoint's batch-norm
  statistics; decode inverts each step in reverse order.

Precision: with ``force_upcast`` (set by the published SD/SDXL/SD3/Flux.1 configs) a ``float16``
request keeps the weights and the computation in float32, because the SDXL VAE's activations overflow
float16 and decode to NaN/black images; bfloat16 has float32's range and is honoured as asked. Outputs
come back in the input's dtype.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import attrs
import torch

from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.weights import empty_weights, load_into
from diffcore_vae import layouts
from diffcore_vae.config import AutoencoderConfig, Flux2Config, KLConfig
from diffcore_vae.network import KLAutoencoderNet, patchify, unpatchify
from diffcore_vae.tiling import tiled


def weights_dtype(config: AutoencoderConfig) -> torch.dtype:
    """The dtype the weights are kept in: float32 when float16 is asked of a force_upcast VAE."""
    dtype = torch_dtype(config.dtype, "$.dtype")
    return torch.float32 if (dtype == torch.float16 and config.force_upcast) else dtype


class Autoencoder:
    """A KL autoencoder with its family's latent normalisation; see the module docstring."""

    def __init__(self, module: KLAutoencoderNet, config: AutoencoderConfig):
        self.module = module.requires_grad_(False).eval()
        self.config = config
        self.family: str = config.family
        self._flux2 = isinstance(config, Flux2Config)
        patch = config.patch_size if isinstance(config, Flux2Config) else [1, 1]
        self._patch = (patch[0], patch[1])
        self.latent_channels: int = config.latent_channels * self._patch[0] * self._patch[1]
        self.downscale: int = module.downscale * self._patch[0]

    # -- placement ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Autoencoder:
        """Move (and optionally cast, with the same float16 upcast rule as loading)."""
        if dtype is not None and dtype == torch.float16 and getattr(self.config, "force_upcast", False):
            dtype = torch.float32
        self.module.to(device=device, dtype=dtype)
        return self

    # -- latents --------------------------------------------------------------------------------
    def encode(
        self, pixels: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> normalised latents; ``sample`` defaults to the config's."""
        sample = self.config.sample if sample is None else sample
        self._check_input(pixels, self.config.in_channels, "pixels")
        if self._flux2 and (pixels.shape[-2] % self.downscale or pixels.shape[-1] % self.downscale):
            raise UserError(
                f"image size {tuple(pixels.shape[-2:])} is not a multiple of {self.downscale}",
                where="pixels",
                hint="Flux.2 latents are patchified 2x2; crop or resize the image",
            )
        x = pixels.to(device=self.device, dtype=self.dtype)
        moments = self._run(self.module.moments, x, Fraction(1, self.module.downscale))
        mean, logvar = moments.chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.device)
        else:
            z = mean
        return self._normalize(z).to(pixels.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] (not clamped)."""
        self._check_input(latents, self.latent_channels, "latents")
        z = self._denormalize(latents.to(device=self.device, dtype=self.dtype))
        out = self._run(self.module.reconstruct, z, Fraction(self.module.downscale))
        return out.to(latents.dtype)

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise UserError(
                f"expected {what} of shape (batch, {channels}, height, width), got {tuple(x.shape)}",
                where=what,
            )

    def _run(self, fn, x: torch.Tensor, scale: Fraction) -> torch.Tensor:
        cfg, down = self.config, self.module.downscale
        # tile sizes are given in pixels; the decoder's input is in latent pixels
        tile, overlap = (
            (cfg.tile_size, cfg.tile_overlap)
            if scale < 1
            else (cfg.tile_size // down, cfg.tile_overlap // down)
        )
        if not cfg.tiling or max(x.shape[-2:]) <= tile:
            return fn(x)
        return tiled(fn, x, tile, overlap, scale)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if isinstance(cfg, KLConfig):
            if cfg.shift_factor is not None:
                z = z - cfg.shift_factor
            return z * cfg.scaling_factor
        z = patchify(z, *self._patch)
        mean, std = self._bn_stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def _denormalize(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if isinstance(cfg, KLConfig):
            z = z / cfg.scaling_factor
            return z + cfg.shift_factor if cfg.shift_factor is not None else z
        mean, std = self._bn_stats(z)
        return unpatchify((z.float() * std + mean).to(z.dtype), *self._patch)

    def _bn_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.module.bn
        mean = bn.running_mean.float().view(1, -1, 1, 1).to(z.device)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + bn.eps).to(z.device)
        return mean, std

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path, layout: str = "diffusers") -> Path:
        """Write the weights: ``"diffusers"`` (a folder with config.json) or ``"original"`` (one file)."""
        return layouts.save(self.module, self.config, path, layout)


def _net(config: AutoencoderConfig) -> KLAutoencoderNet:
    flux2 = isinstance(config, Flux2Config)
    patch = config.patch_size if flux2 else None
    return KLAutoencoderNet(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        latent_channels=config.latent_channels,
        block_out_channels=list(config.block_out_channels),
        decoder_block_out_channels=config.decoder_block_out_channels if flux2 else None,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_block_add_attention,
        patch_channels=config.latent_channels * patch[0] * patch[1] if flux2 else None,
        batch_norm_eps=config.batch_norm_eps if flux2 else 1e-4,
        batch_norm_momentum=config.batch_norm_momentum if flux2 else 0.1,
    )


def _check(config: AutoencoderConfig, source: layouts.Source | None = None) -> None:
    """Sizes that cannot build the network are a user error naming the option to set. ``source``:
    the checkpoint the widths were read from (None: the options gave them)."""
    widths = list(config.block_out_channels)
    if isinstance(config, Flux2Config):
        widths += list(config.decoder_block_out_channels or [])
        if len(config.patch_size) != 2 or min(config.patch_size) < 1:
            raise UserError("patch_size must be two positive integers", where="$.patch_size")
    groups = config.norm_num_groups
    if not widths or groups < 1 or any(w % groups for w in widths):
        if source is None:
            raise UserError(
                f"every block width must divide into norm_num_groups={groups} groups (got {widths})",
                where="$.block_out_channels",
            )
        common = math.gcd(*widths) or 1
        fit = max(d for d in range(1, min(common, 32) + 1) if common % d == 0)
        stated = source.config_json is not None and "norm_num_groups" in source.config_json
        raise UserError(
            f"this autoencoder's block widths {widths} do not divide into norm_num_groups={groups} groups",
            where=str(Path(source.where) / "config.json") if stated else source.where,
            # a single file does not record its groups: they come from the options (default 32)
            hint=f"fix norm_num_groups in that config.json, e.g. {fit}"
            if stated
            else f"set the autoencoder option norm_num_groups, e.g. {fit}: a model's vae_options or autoencoder_options",
        )
    down = 2 ** (len(config.block_out_channels) - 1)
    if config.tiling and (
        config.tile_size % down or config.tile_overlap % down or config.tile_overlap >= config.tile_size
    ):
        raise UserError(
            f"tile_size and tile_overlap must be multiples of {down} with overlap < size",
            where="$.tile_size",
        )


def build_autoencoder(config: AutoencoderConfig) -> Autoencoder:
    """An autoencoder from its config: loaded from ``config.pretrained``, else randomly initialised."""
    if config.pretrained is None:
        _check(config)
        net = _net(config).to(weights_dtype(config))
        return Autoencoder(net, config)
    source = layouts.locate(config.pretrained)
    config = layouts.architecture(source, config)
    _check(config, source)
    with empty_weights():
        net = _net(config)
    levels = len(config.block_out_channels)
    stream = layouts.tensors(source, net, levels, isinstance(config, Flux2Config))
    load_into(net, stream, where=source.where, dtype=weights_dtype(config))
    return Autoencoder(net, attrs.evolve(config, pretrained=str(config.pretrained)))
