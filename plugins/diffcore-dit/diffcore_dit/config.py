"""The ``model: {type: dit}`` section and the architecture it resolves to (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from diffcore.errors import UserError

#: (hidden_size, depth, num_heads) of the published sizes; the patch comes from the "/p" suffix.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCHES = (2, 4, 8)


@attrs.define(kw_only=True)
class DiTConfig:
    """Options of the ``dit`` model.

    The architecture is a ``size`` preset ("S/2" ... "XL/8") or the free fields; a free field given
    with a preset overrides it. With ``pretrained`` the checkpoint decides the shapes.
    """

    size: str | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    #: image channels (3 in pixel space) or latent channels (taken from the autoencoder when set)
    in_channels: int | None = None
    #: side of the square input the positional grid is built for (pixels, or latent pixels)
    input_size: int = 32
    num_classes: int = 1000
    #: a second set of C output channels (the learned variance of the original DiT); ignored by predict
    learn_sigma: bool = False
    #: eps of the LayerNorm before the MLP (1e-6 in the original DiT, 1e-5 in diffusers' default config)
    norm_eps: float = 1e-6
    prediction_type: Literal["eps", "v", "flow"] = "eps"
    #: diffusers folder (or one with a transformer/ subfolder) or an original-layout .safetensors file
    pretrained: str | None = None
    #: latent space: the autoencoder family ("sd", "sdxl", "flux"...) from diffcore-vae; None = pixels
    autoencoder: str | None = None
    autoencoder_pretrained: str | None = None
    #: False skips loading the autoencoder: for training from a complete latent cache, where the loop
    #: sets it (sampling then needs a model loaded with it)
    load_encoders: bool = True
    #: further options of that autoencoder family's config (dtype, tiling, or shapes for a random one)
    autoencoder_options: dict[str, Any] = attrs.Factory(dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False


@attrs.frozen(kw_only=True)
class DiTArch:
    """The resolved shapes of one DiT."""

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_hidden: int
    in_channels: int
    input_size: int
    num_classes: int
    learn_sigma: bool
    norm_eps: float = 1e-6

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def check(self, where: str = "$.model") -> DiTArch:
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}", where=where
            )
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise UserError(f"hidden_size {self.hidden_size} must be a multiple of 4", where=where)
        if self.input_size % self.patch_size:
            raise UserError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}",
                where=where,
                hint="pick a patch of 2, 4 or 8 that divides the (latent) image side",
            )
        return self


def parse_size(size: str, where: str = "$.model.size") -> tuple[int, int, int, int]:
    """ "XL/2" -> (hidden_size, depth, num_heads, patch_size)."""
    name, _, patch = size.partition("/")
    if name.upper() not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
        raise UserError(
            f"unknown DiT size {size!r}",
            where=where,
            hint="one of " + ", ".join(f"{n}/{p}" for n in SIZES for p in PATCHES),
        )
    hidden, depth, heads = SIZES[name.upper()]
    return hidden, depth, heads, int(patch)


def heads_for(hidden_size: int) -> int | None:
    """The head count of the published size with this width (checkpoints do not record it)."""
    for hidden, _, heads in SIZES.values():
        if hidden == hidden_size:
            return heads
    return None


def arch_from_config(config: DiTConfig, in_channels: int | None = None) -> DiTArch:
    """Resolve the preset and free fields of ``config`` (random init, no checkpoint)."""
    hidden = depth = heads = patch = None
    if config.size is not None:
        hidden, depth, heads, patch = parse_size(config.size)
    hidden = config.hidden_size or hidden
    depth = config.depth or depth
    heads = config.num_heads or heads
    patch = config.patch_size or patch
    missing = [
        n
        for n, v in [("hidden_size", hidden), ("depth", depth), ("num_heads", heads), ("patch_size", patch)]
        if not v
    ]
    if missing:
        raise UserError(
            "the DiT's shape is not given: missing " + ", ".join(missing),
            where="$.model",
            hint='set size: "S/2" (S, B, L, XL with patch 2, 4, 8) or hidden_size, depth, num_heads, patch_size',
        )
    return DiTArch(
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        mlp_hidden=int(hidden * config.mlp_ratio),
        in_channels=config.in_channels or in_channels or 3,
        input_size=config.input_size,
        num_classes=config.num_classes,
        learn_sigma=config.learn_sigma,
        norm_eps=config.norm_eps,
    ).check()
