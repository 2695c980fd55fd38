"""Built-in text encoders (records only; no torch at import)."""

from __future__ import annotations

from diffcore.records import TextEncoderSpec
from diffcore.text_encoders.config import CONFIGS

_DESCRIPTIONS = {
    "clip-l": "CLIP ViT-L/14 text tower (SD1, SDXL, SD3, Flux.1 pooled vector)",
    "openclip-bigg": "OpenCLIP ViT-bigG text tower with projection (SDXL, SD3)",
    "t5": "T5 encoder, e.g. T5-XXL (Flux.1, SD3)",
    "qwen3": "Qwen3 LLM, hidden layers 9, 18, 27 stacked (Flux.2 klein)",
    "mistral": "Mistral-Small 3.x LLM, hidden layers 10, 20, 30 stacked (Flux.2 dev)",
}


def _build(family: str):
    def build(config):
        from diffcore.text_encoders.loading import load_text_encoder

        return load_text_encoder(family, config)

    return build


def records() -> list:
    return [
        TextEncoderSpec(name=family, config=config, factory=_build(family), description=_DESCRIPTIONS[family])
        for family, config in CONFIGS.items()
    ]
