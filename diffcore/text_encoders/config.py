"""Options of each text-encoder family (torch-free: the registration records use them at discovery).

Every family reads a diffusers folder (a pipeline with ``subfolder``, or a component folder) or a
single safetensors file; ``options`` overrides fields of the transformers config, which is otherwise
read from ``config.json`` or, for a single file, from the tensor shapes and the family's preset.
"""

from __future__ import annotations

from typing import Any

import attrs

#: the families the kernel loads, each a registered text-encoder name
FAMILIES = ("clip-l", "openclip-bigg", "t5", "qwen3", "mistral")

#: BFL's Flux.2 system prompt for its Mistral encoder (diffusers' Flux2Pipeline uses it verbatim)
FLUX2_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)


@attrs.define(kw_only=True)
class EncoderConfig:
    """What every family takes.

    ``pretrained``: a pipeline folder (with ``subfolder``), a component folder, or a ``.safetensors``
    file. ``prefix``: the key prefix inside a single file (default: the family's known prefixes, tried
    in order). ``tokenizer``: a tokenizer folder (default: ``tokenizer<suffix>`` beside the encoder,
    or the encoder folder itself). ``dtype``: what the weights are loaded in.
    """

    pretrained: str | None = None
    subfolder: str | None = None
    prefix: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    max_length: int = 77
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class ClipConfig(EncoderConfig):
    """CLIP text towers. ``layer``: ``"last"`` (final-norm output), ``"penultimate"`` (second to last
    layer, no final norm: SDXL) or a hidden-state index. ``projection``: build the projection head
    (pooled output is then ``text_embeds``, else ``pooler_output``)."""

    layer: str | int = "last"
    projection: bool = False


@attrs.define(kw_only=True)
class OpenClipConfig(ClipConfig):
    """OpenCLIP ViT-bigG (SDXL's second encoder), as a transformers CLIP text model with projection."""

    layer: str | int = "penultimate"
    projection: bool = True


@attrs.define(kw_only=True)
class T5Config(EncoderConfig):
    """T5 encoder (T5EncoderModel); the sequence is padded to ``max_length``. ``attention_mask``: pass
    the padding mask to the encoder (Flux.1 and SD3 do not)."""

    max_length: int = 512
    attention_mask: bool = False


@attrs.define(kw_only=True)
class LLMConfig(EncoderConfig):
    """A decoder-only LLM used as an encoder: the prompt goes through the tokenizer's chat template and
    the hidden states of ``layers`` (indices into ``output_hidden_states``, 0 = embeddings) are
    concatenated along features, giving ``len(layers) * hidden_size`` features per token."""

    max_length: int = 512
    layers: tuple[int, ...] = attrs.field(default=(9, 18, 27), converter=tuple)
    system_message: str | None = None
    add_generation_prompt: bool = True
    #: extra variables of the chat template (Qwen3: thinking off)
    template_options: dict[str, Any] = attrs.field(factory=lambda: {"enable_thinking": False})
    #: messages hold a list of ``{"type": "text"}`` parts instead of a string (processor templates)
    content_parts: bool = False
    #: the template writes BOS and the other special tokens itself, so none are added when tokenizing
    template_tokens: bool = False


@attrs.define(kw_only=True)
class Qwen3Config(LLMConfig):
    """Qwen3 (Flux.2 klein): layers 9, 18, 27; user turn only, generation prompt added, thinking off."""


@attrs.define(kw_only=True)
class MistralConfig(LLMConfig):
    """Mistral-Small 3.x (Flux.2 dev): layers 10, 20, 30; BFL's system message, no generation prompt."""

    layers: tuple[int, ...] = attrs.field(default=(10, 20, 30), converter=tuple)
    system_message: str | None = FLUX2_SYSTEM_MESSAGE
    add_generation_prompt: bool = False
    template_options: dict[str, Any] = attrs.field(factory=dict)
    content_parts: bool = True
    template_tokens: bool = True


CONFIGS: dict[str, type[EncoderConfig]] = {
    "clip-l": ClipConfig,
    "openclip-bigg": OpenClipConfig,
    "t5": T5Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}
