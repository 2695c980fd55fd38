"""Whether a weights file or folder is a DiT, and in which layout (torch-free: ``ModelSpec.detect``)."""

from __future__ import annotations

from diffcore.layouts import LayoutProbe


def detect(probe: LayoutProbe) -> str | None:
    """"original" (facebookresearch/DiT), "diffusers" (DiTTransformer2DModel) or None."""
    keys = probe.component("transformer")
    if {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight"} <= set(keys):
        return "original"
    if {"pos_embed.proj.weight", "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"} <= set(keys):
        return "diffusers"
    return None
