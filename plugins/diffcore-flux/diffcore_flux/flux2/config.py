"""The ``model: {type: flux2}`` section (torch-free: read at plugin discovery)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from diffcore.errors import UserError

Variant = Literal["dev", "klein-4b", "klein-9b"]


@attrs.frozen(kw_only=True)
class Flux2Shape:
    """Sizes of a Flux.2 transformer (defaults: the released 32B dev model)."""

    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: float = 2000.0
    in_channels: int = 128
    #: channels the transformer predicts (the latent's); differs from in_channels in channel-concat Fill
    out_channels: int = 128
    context_in_dim: int = 15360
    mlp_ratio: float = 3.0
    guidance_embed: bool = True

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


#: the released checkpoints' sizes (REFERENCE.md, Flux.2)
VARIANTS: dict[str, Flux2Shape] = {
    "dev": Flux2Shape(),
    "klein-9b": Flux2Shape(
        hidden_size=4096, num_heads=32, depth=8, depth_single=24, context_in_dim=12288, guidance_embed=False
    ),
    "klein-4b": Flux2Shape(
        hidden_size=3072, num_heads=24, depth=5, depth_single=20, context_in_dim=7680, guidance_embed=False
    ),
}


@attrs.define(kw_only=True)
class Flux2Config:
    """Flux.2 dev (Mistral-Small text encoder, distilled guidance) or klein 4B/9B (Qwen3, no guidance).

    ``pretrained``: a diffusers pipeline folder (transformer/, text_encoder/, tokenizer/, vae/), a
    diffusers transformer folder, BFL's single file (flux2-dev.safetensors, ComfyUI prefixes allowed) or
    a single file with diffusers key names. ``text_encoder`` / ``tokenizer`` / ``vae`` override or
    complete it (a ComfyUI text-encoder file needs ``tokenizer``). Without ``pretrained`` the transformer
    is random with the variant's sizes, or the sizes given in ``shape`` (tests).

    Edit training: references (the batch's ``reference``, one image or a list) are appended along the
    sequence with time ids 10, 20, ...; with a ``mask`` the model is a Fill model, in the reference form
    (klein, Flux2KleinInpaintPipeline) or, when the checkpoint's in_channels ask for it, the channel-
    concatenation form Flux.1 Fill uses.
    """

    variant: Variant = "klein-4b"
    pretrained: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    vae: str | None = None
    #: extra options of the Flux.2 autoencoder (``diffcore.load_autoencoder("flux2", ...)``), e.g. tiny sizes
    vae_options: dict[str, Any] = attrs.field(factory=dict)
    #: extra options of the text encoder's transformers config (tests build tiny ones)
    text_encoder_options: dict[str, Any] = attrs.field(factory=dict)
    #: hidden-state layers stacked as the text features (default: dev 10, 20, 30; klein 9, 18, 27)
    text_layers: list[int] | None = None
    #: False skips loading the text encoder and the autoencoder (training from a complete cache)
    load_encoders: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: the distilled-guidance value passed while training dev (unused by klein)
    guidance: float = 1.0
    #: text tokens per caption (both reference pipelines use 512)
    max_sequence_length: int = 512
    #: sizes of a randomly initialised transformer (keys of :class:`Flux2Shape`); a checkpoint's own win
    shape: dict[str, Any] = attrs.field(factory=dict)

    def random_shape(self) -> Flux2Shape:
        base = VARIANTS[self.variant]
        fields = dict(self.shape)
        known = set(attrs.fields_dict(Flux2Shape))
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(
                f"unknown shape keys {', '.join(unknown)}",
                where="$.model.shape",
                hint=f"known: {', '.join(sorted(known))}",
            )
        if "axes_dim" in fields:
            fields["axes_dim"] = tuple(fields["axes_dim"])
        fields.setdefault("guidance_embed", self.variant == "dev")
        shape = attrs.evolve(base, **fields)
        if "out_channels" not in self.shape:
            shape = attrs.evolve(shape, out_channels=shape.in_channels)
        return shape

    @property
    def is_dev(self) -> bool:
        return self.variant == "dev"
