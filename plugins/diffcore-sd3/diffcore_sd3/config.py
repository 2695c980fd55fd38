"""The ``model: {type: sd3}`` and ``{type: sd35}`` sections (torch-free: read at plugin discovery)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

#: MMDiT-X (SD3.5 medium) puts a second, image-only attention in these layers
MEDIUM_DUAL_LAYERS = tuple(range(13))


@attrs.frozen(kw_only=True)
class TransformerShape:
    """Sizes of an SD3 MMDiT (defaults: SD3 medium, 2B)."""

    hidden_size: int = 1536
    num_heads: int = 24
    depth: int = 24
    in_channels: int = 16
    patch_size: int = 2
    pooled_dim: int = 2048
    context_dim: int = 4096
    pos_embed_max_size: int = 192
    #: latent side the random-init position table is laid out for (diffusers' ``sample_size``); a
    #: checkpoint stores its table, so this is not part of what makes two shapes equal
    sample_size: int = attrs.field(default=128, eq=False)
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


#: the released checkpoints: what a variant expects (checked against the file when loading)
VARIANTS: dict[str, dict[str, Any]] = {
    "medium": dict(hidden_size=1536, num_heads=24, depth=24, pos_embed_max_size=384,
                   qk_norm=True, dual_attention_layers=MEDIUM_DUAL_LAYERS),
    "large": dict(hidden_size=2432, num_heads=38, depth=38, pos_embed_max_size=192, qk_norm=True),
    "large-turbo": dict(hidden_size=2432, num_heads=38, depth=38, pos_embed_max_size=192, qk_norm=True),
    "sd3-medium": dict(hidden_size=1536, num_heads=24, depth=24, pos_embed_max_size=192, qk_norm=False),
}  # fmt: skip


@attrs.define(kw_only=True)
class SD3Config:
    """Stable Diffusion 3 medium (``type: sd3``) or 3.5 large / large-turbo / medium (``type: sd35``).

    ``pretrained``: a diffusers pipeline folder (transformer/, text_encoder/, text_encoder_2/,
    text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/, vae/), a diffusers transformer folder, or
    the original single file (``model.diffusion_model.joint_blocks...``, with or without
    ``text_encoders.{clip_l,clip_g,t5xxl}`` and ``first_stage_model.`` inside). The other paths
    override or complete it: ComfyUI users keep ``clip_l``, ``clip_g`` and ``t5xxl`` as separate files.
    Without ``pretrained`` the transformer is random, with the sizes below (for tests).
    """

    #: sd35 only: which SD3.5 checkpoint (checked against the file's shapes)
    variant: Literal["large", "large-turbo", "medium"] = "large"
    pretrained: str | None = None
    text_encoder: str | None = None
    text_encoder_2: str | None = None
    text_encoder_3: str | None = None
    tokenizer: str | None = None
    tokenizer_2: str | None = None
    tokenizer_3: str | None = None
    #: False: no T5; its part of the sequence is zeros, as diffusers does without text_encoder_3
    t5: bool = True
    vae: str | None = None
    #: extra options of the SD3 autoencoder (``diffcore.load_autoencoder("sd3", ...)``), e.g. tiny sizes
    vae_options: dict[str, Any] = attrs.field(factory=dict)
    #: False skips loading the text encoders and the autoencoder (training from a complete cache)
    load_encoders: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: dtype of the text encoders and the VAE (default: ``dtype``)
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: T5 tokens per caption (diffusers' max_sequence_length, 256 by default, up to 512)
    max_sequence_length: int = 256
    #: CLIP tokens per caption (77; longer windows are cut to the encoders' position table)
    clip_max_length: int = 77
    # Sizes of a randomly initialised transformer (None: the variant's); a checkpoint's own sizes win
    # when one is loaded.
    hidden_size: int | None = None
    num_heads: int | None = None
    depth: int | None = None
    in_channels: int = 16
    patch_size: int = 2
    pooled_dim: int = 2048
    context_dim: int = 4096
    pos_embed_max_size: int | None = None
    sample_size: int = 128
    qk_norm: bool | None = None
    dual_attention_layers: list[int] | None = None

    @property
    def family(self) -> str:
        """The VARIANTS key this section describes."""
        return self.variant

    def shape(self) -> TransformerShape:
        preset = VARIANTS[self.family]

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return preset[name] if value is None else value

        dual = self.dual_attention_layers
        return TransformerShape(
            hidden_size=pick("hidden_size"),
            num_heads=pick("num_heads"),
            depth=pick("depth"),
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            pooled_dim=self.pooled_dim,
            context_dim=self.context_dim,
            pos_embed_max_size=pick("pos_embed_max_size"),
            sample_size=self.sample_size,
            qk_norm=pick("qk_norm"),
            dual_attention_layers=tuple(preset.get("dual_attention_layers", ()) if dual is None else dual),
        )


@attrs.define(kw_only=True)
class SD3MediumConfig(SD3Config):
    """``type: sd3``: Stable Diffusion 3 medium (MMDiT without q/k norm)."""

    variant: Literal["medium"] = "medium"

    @property
    def family(self) -> str:
        return "sd3-medium"
