"""Whether a weights file or folder is a Flux.1 or Flux.2 transformer, and in which layout
(torch-free: ``ModelSpec.detect``).

Both generations share BFL's double/single block names; Flux.1 alone has the pooled-text input
(``vector_in``, diffusers ``time_text_embed.text_embedder``), Flux.2 alone the shared modulations
(``double_stream_modulation_img``).
"""

from __future__ import annotations

from diffcore.layouts import LayoutProbe

#: BFL's own files have no prefix; ComfyUI's all-in-one files put the transformer under one of these
_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def _original(keys: set[str]) -> set[str] | None:
    for prefix in _PREFIXES:
        if prefix + "double_blocks.0.img_attn.qkv.weight" in keys:
            return {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    return None


def detect_flux(probe: LayoutProbe) -> str | None:
    """Flux.1: "original" (BFL/ComfyUI), "diffusers" (FluxTransformer2DModel) or None."""
    keys = set(probe.component("transformer"))
    own = _original(keys)
    if own is not None:
        return "original" if "vector_in.in_layer.weight" in own else None
    if {"x_embedder.weight", "single_transformer_blocks.0.proj_mlp.weight"} <= keys and (
        "time_text_embed.text_embedder.linear_1.weight" in keys
    ):
        return "diffusers"
    return None


def detect_flux2(probe: LayoutProbe) -> str | None:
    """Flux.2: "original" (BFL/ComfyUI), "diffusers" (Flux2Transformer2DModel) or None."""
    keys = set(probe.component("transformer"))
    own = _original(keys)
    if own is not None:
        return "original" if "double_stream_modulation_img.lin.weight" in own else None
    if {"x_embedder.weight", "double_stream_modulation_img.linear.weight"} <= keys:
        return "diffusers"
    return None
