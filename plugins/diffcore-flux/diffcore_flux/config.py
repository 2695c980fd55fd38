"""The ``model: {type: flux}`` section (torch-free: read at plugin discovery)."""

from __future__ import annotations

from typing import Any, Literal

import attrs


@attrs.frozen(kw_only=True)
class TransformerShape:
    """Sizes of a Flux.1 transformer (defaults: the released 12B dev model)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    guidance_embed: bool = True


@attrs.define(kw_only=True)
class FluxConfig:
    """Flux.1 dev or schnell, optionally with Kontext reference-image conditioning.

    ``pretrained``: a diffusers pipeline folder (transformer/, text_encoder/, text_encoder_2/, tokenizer/,
    tokenizer_2/, vae/), a diffusers transformer folder, BFL's single file (flux1-dev.safetensors) or a
    single file with diffusers key names.
    The other paths override or complete it (a single file needs the text encoders, tokenizers and VAE
    named). With no ``pretrained`` the transformer is random, with the sizes below (for tests).
    """

    variant: Literal["dev", "schnell"] = "dev"
    kontext: bool = False
    pretrained: str | None = None
    text_encoder: str | None = None
    text_encoder_2: str | None = None
    tokenizer: str | None = None
    tokenizer_2: str | None = None
    vae: str | None = None
    #: extra options of the Flux autoencoder (``diffcore.load_autoencoder("flux", ...)``), e.g. tiny sizes
    vae_options: dict[str, Any] = attrs.field(factory=dict)
    #: False skips loading the text encoders and the autoencoder: for training from a complete
    #: latent/text cache, where the loop sets it
    load_encoders: bool = True
    #: dtype of the transformer; frozen parts (text encoders, VAE) use ``frozen_dtype`` (default: the same)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: the distilled guidance value passed while training the dev model
    guidance: float = 1.0
    #: T5 tokens per caption (default 512 for dev, 256 for schnell)
    max_sequence_length: int | None = None
    # Sizes of a randomly initialised transformer; a checkpoint's own sizes win when one is loaded.
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single: int = 38
    axes_dim: list[int] = attrs.field(factory=lambda: [16, 56, 56])
    theta: float = 10000.0
    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    mlp_ratio: float = 4.0

    def shape(self) -> TransformerShape:
        return TransformerShape(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single=self.depth_single,
            axes_dim=tuple(self.axes_dim),
            theta=self.theta,
            in_channels=self.in_channels,
            vec_in_dim=self.vec_in_dim,
            context_in_dim=self.context_in_dim,
            mlp_ratio=self.mlp_ratio,
            guidance_embed=self.variant == "dev",
        )

    @property
    def text_length(self) -> int:
        if self.max_sequence_length is not None:
            return self.max_sequence_length
        return 512 if self.variant == "dev" else 256
