"""Configuration of the SD UNet family: the user-facing model sections and the UNet architecture.

Torch-free: the plugin entry point imports this module during discovery.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs

from diffcore.errors import UserError

Family = Literal["sdxl", "sd15", "sd21"]


def _tuple(value: Any) -> tuple:
    return tuple(value)


@attrs.frozen(kw_only=True)
class UNetConfig:
    """The shape of a conditional UNet, per resolution level (``len(block_out_channels)`` levels).

    ``heads`` is the attention head count per level (diffusers calls it ``attention_head_dim``
    for historical reasons); up blocks mirror the down blocks, the mid block uses the last level.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = attrs.field(converter=_tuple)
    attention: tuple[bool, ...] = attrs.field(converter=_tuple)
    layers_per_block: int = 2
    transformer_layers: tuple[int, ...] = attrs.field(converter=_tuple)
    heads: tuple[int, ...] = attrs.field(converter=_tuple)
    cross_attention_dim: int = 768
    linear_projection: bool = False
    #: SDXL micro-conditioning: sinusoid width per size/crop number; None = no added embedding
    addition_time_embed_dim: int | None = None
    #: input width of the added embedding: pooled text width + 6 * addition_time_embed_dim
    addition_input_dim: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5

    def __attrs_post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in ("attention", "transformer_layers", "heads"):
            if len(getattr(self, name)) != n:
                raise UserError(
                    f"{name} has {len(getattr(self, name))} entries for {n} levels", where="unet config"
                )

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def pooled_dim(self) -> int | None:
        if self.addition_time_embed_dim is None or self.addition_input_dim is None:
            return None
        return self.addition_input_dim - 6 * self.addition_time_embed_dim

    # -- the diffusers config.json -----------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], where: str = "unet/config.json") -> UNetConfig:
        """Read a diffusers ``UNet2DConditionModel`` config; unsupported variants are a UserError."""
        for key, ok in (
            ("class_embed_type", None),
            ("time_cond_proj_dim", None),
            ("encoder_hid_dim", None),
            ("num_class_embeds", None),
            ("center_input_sample", False),
            ("act_fn", "silu"),
            ("attention_type", "default"),
            ("resnet_time_scale_shift", "default"),
            ("flip_sin_to_cos", True),
            ("freq_shift", 0),
            ("dual_cross_attention", False),
            ("only_cross_attention", False),
            ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ):
            if cfg.get(key, ok) != ok:
                raise UserError(f"{key}={cfg[key]!r} is not supported by this UNet", where=where)
        down = list(cfg.get("down_block_types", []))
        up = list(cfg.get("up_block_types", []))
        attention = [t == "CrossAttnDownBlock2D" for t in down]
        if (
            any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down)
            or [t == "CrossAttnUpBlock2D" for t in up] != attention[::-1]
        ):
            raise UserError(f"block types {down} / {up} are not a mirrored SD UNet", where=where)
        n = len(down)
        channels = cfg.get("block_out_channels", [320, 640, 1280, 1280])
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        layers = cfg.get("transformer_layers_per_block", 1)
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            raise UserError(
                f"addition_embed_type={cfg['addition_embed_type']!r} is not supported", where=where
            )
        text_time = cfg.get("addition_embed_type") == "text_time"
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            attention=attention,
            layers_per_block=cfg.get("layers_per_block", 2),
            transformer_layers=layers if isinstance(layers, (list, tuple)) else [layers] * n,
            heads=heads if isinstance(heads, (list, tuple)) else [heads] * n,
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") if text_time else None,
            addition_input_dim=cfg.get("projection_class_embeddings_input_dim") if text_time else None,
            norm_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
        )

    def to_diffusers(self, sample_size: int = 128) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DConditionModel`` config (what ``unet/config.json`` holds)."""
        text_time = self.addition_time_embed_dim is not None
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.attention[::-1]],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.heads),
            "transformer_layers_per_block": list(self.transformer_layers),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.linear_projection,
            "addition_embed_type": "text_time" if text_time else None,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.addition_input_dim,
            "norm_num_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
        }


UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        attention=(False, True, True),
        transformer_layers=(1, 2, 10),
        heads=(5, 10, 20),
        cross_attention_dim=2048,
        linear_projection=True,
        addition_time_embed_dim=256,
        addition_input_dim=2816,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        attention=(True, True, True, False),
        transformer_layers=(1, 1, 1, 1),
        heads=(8, 8, 8, 8),
        cross_attention_dim=768,
    ),
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        attention=(True, True, True, False),
        transformer_layers=(1, 1, 1, 1),
        heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        linear_projection=True,
    ),
}

#: transformers CLIPTextConfig keyword arguments of the released text encoders
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "clip-l": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    "openclip-h": dict(  # SD2: the last of 24 layers is dropped, its output is the penultimate one
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=512,
    ),
    "openclip-bigg": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    ),
}


@attrs.define(kw_only=True)
class SDConfig:
    """The ``model`` section shared by the family; each family's class sets its defaults."""

    FAMILY: ClassVar[str] = "sd15"

    #: a diffusers pipeline folder or an original single ``.safetensors`` file; None = random init
    pretrained: str | None = None
    #: tokenizer folders (transformers CLIPTokenizer files) for a single file, which holds none
    tokenizer: str | None = None
    #: a separate VAE (folder or file) instead of the one in ``pretrained``
    vae: str | None = None
    #: False runs without an autoencoder (latents given directly, e.g. cached)
    autoencoder: bool = True
    #: extra options of the autoencoder section (diffcore-vae's config keys, e.g. ``tiling``)
    vae_options: dict[str, Any] = attrs.field(factory=dict)
    #: False skips loading the text encoders and the autoencoder: for training from a complete
    #: latent/text cache, where the loop sets it
    load_encoders: bool = True
    prediction_type: Literal["eps", "v"] = "eps"
    #: default training/sampling size in pixels (also the default SDXL size conditioning)
    resolution: int = 512
    #: dtype the frozen text encoders (and VAE) are loaded in
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    #: architecture overrides (UNetConfig fields) for random init or an unusual single file
    unet: dict[str, Any] = attrs.field(factory=dict)
    #: transformers CLIPTextConfig overrides for the first text encoder (random init / single file)
    text_encoder: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class SD15Config(SDConfig):
    """Stable Diffusion 1.x: CLIP-L final-layer text states, eps prediction at 512 px."""

    FAMILY: ClassVar[str] = "sd15"


@attrs.define(kw_only=True)
class SD21Config(SDConfig):
    """Stable Diffusion 2.x: OpenCLIP-H penultimate states, v-prediction at 768 px."""

    FAMILY: ClassVar[str] = "sd21"
    prediction_type: Literal["eps", "v"] = "v"
    resolution: int = 768


@attrs.define(kw_only=True)
class SDXLConfig(SDConfig):
    """SDXL base: CLIP-L + OpenCLIP-bigG penultimate states, pooled text and size/crop conditioning."""

    FAMILY: ClassVar[str] = "sdxl"
    resolution: int = 1024
    tokenizer_2: str | None = None
    #: transformers CLIPTextConfig overrides for the second (projection) text encoder
    text_encoder_2: dict[str, Any] = attrs.field(factory=dict)
