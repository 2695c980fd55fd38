"""Decoder-only LLMs used as text encoders (Flux.2: Qwen3 for klein, Mistral-Small 3.x for dev).

Only the base transformer is built (``Qwen3Model`` / ``MistralModel``: no LM head, no vision tower),
and only up to the deepest layer asked for: the hidden states of the chosen layers are identical to the
full model's, and the layers above them are neither loaded nor run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders.config import LLMConfig
from diffcore.text_encoders.encoder import Encoded, TextEncoder
from diffcore.text_encoders.sources import Source
from diffcore.weights import empty_weights, load_into

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3": dict(  # Qwen3-4B (Flux.2 klein 4B)
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "mistral": dict(  # Mistral-Small-3.1-24B's text model (Flux.2 dev)
        vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000_000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072, sliding_window=None,
    ),
}  # fmt: skip
# where the base transformer's keys start: a bare model, a ForCausalLM ("model."), or Mistral3's
# vision-language wrapper as transformers 4 ("language_model.model.") and 5 ("model.language_model.") save it
PREFIXES: dict[str, tuple[str, ...]] = {
    "qwen3": ("", "model."),
    "mistral": ("", "model.", "language_model.model.", "model.language_model."),
}
ANCHORS = ("embed_tokens.weight",)
_LAYER = re.compile(r"layers\.(\d+)\.")


def _classes(family: str) -> tuple[type, type[nn.Module]]:
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        return Qwen3Config, Qwen3Model
    from transformers import MistralConfig, MistralModel

    return MistralConfig, MistralModel


def _shape(source: Source, family: str, options: dict[str, Any]) -> dict[str, Any]:
    vocab, hidden = source.shape("embed_tokens.weight")
    attention = "layers.0.self_attn."
    if "head_dim" in options:
        head_dim = options["head_dim"]
    elif attention + "q_norm.weight" in source:  # Qwen3's per-head q/k norm is head_dim wide
        head_dim = source.shape(attention + "q_norm.weight")[0]
    else:
        head_dim = PRESETS[family]["head_dim"]
    layers = {int(m.group(1)) for k in source.keys() if (m := _LAYER.match(k)) is not None}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=source.shape("layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=source.shape(attention + "q_proj.weight")[0] // head_dim,
        num_key_value_heads=source.shape(attention + "k_proj.weight")[0] // head_dim,
        head_dim=head_dim,
    )


def llm_config(family: str, config: LLMConfig, source: Source | None = None) -> Any:
    """The transformers config, cut after the deepest layer in ``config.layers``."""
    config_class, _ = _classes(family)
    if source is None:
        fields = dict(PRESETS[family])
    elif source.config is not None:
        fields = dict(source.config)
    else:
        fields = {**PRESETS[family], **_shape(source, family, config.options)}
    fields.update(config.options)
    depth = fields["num_hidden_layers"]
    if not config.layers or max(config.layers) > depth or min(config.layers) < 0:
        raise UserError(
            f"hidden layers {list(config.layers)} do not exist in a {depth}-layer model",
            where="layers",
            hint=f"use indices from 0 (embeddings) to {depth}",
        )
    # hidden_states[k] is layer k's output for k < depth; it is only the final-norm output at depth
    keep = depth if max(config.layers) == depth else max(config.layers) + 1
    fields["num_hidden_layers"] = keep
    if isinstance(fields.get("layer_types"), list):  # saved configs list one attention type per layer
        fields["layer_types"] = fields["layer_types"][:keep]
    return config_class(**fields)


def _fresh_rotary(model: nn.Module) -> nn.Module:
    # inv_freq is a non-persistent buffer computed at construction: rebuild it off the meta device
    model.rotary_emb = type(model.get_submodule("rotary_emb"))(config=model.config)
    return model


def random_llm(family: str, config: LLMConfig) -> nn.Module:
    _, model_class = _classes(family)
    return model_class(llm_config(family, config)).eval()


def load_llm(source: Source, family: str, config: LLMConfig, dtype: torch.dtype) -> nn.Module:
    _, model_class = _classes(family)
    hf_config = llm_config(family, config, source)
    with empty_weights():
        model = model_class(hf_config)
    keep = hf_config.num_hidden_layers

    def rename(key: str) -> str | None:
        m = _LAYER.match(key)
        if m is not None and int(m.group(1)) >= keep:
            return None  # above the deepest layer used
        return key

    load_into(model, source.items(), where=source.where, dtype=dtype, rename=rename)
    return _fresh_rotary(model).eval()


class LLMEncoder(TextEncoder):
    """An LLM encoder: captions go through the chat template, padded to ``max_length``; ``hidden`` is
    the chosen layers' states concatenated along features; ``mask`` marks the real tokens."""

    config: LLMConfig

    def _conversation(self, caption: str) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        if self.config.system_message is not None:
            turns.append({"role": "system", "content": self._content(self.config.system_message)})
        turns.append({"role": "user", "content": self._content(caption)})
        return turns

    def _content(self, text: str) -> Any:
        if not self.config.content_parts:
            return text
        # "[IMG]" in a caption would be read as an image slot by Mistral's processor template
        return [{"type": "text", "text": text.replace("[IMG]", "")}]

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tokenizer.chat_template:
            raise UserError(
                f"the {self.family} tokenizer has no chat template",
                where="tokenizer",
                hint="use the tokenizer folder shipped with the model (it holds chat_template)",
            )
        conversations = [self._conversation(c) for c in captions]
        common = dict(add_generation_prompt=self.config.add_generation_prompt, **self.config.template_options)
        padding = dict(
            padding="max_length", truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        if self.config.template_tokens:
            # the template writes the special tokens itself: tokenized without adding any
            out = self.tokenizer.apply_chat_template(
                conversations, tokenize=True, return_dict=True, **common, **padding
            )
        else:
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, **common) for c in conversations]
            out = self.tokenizer(texts, **padding)
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        return Encoded(stacked_states(self.model, ids, mask, self.config.layers), None, mask)


def stacked_states(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]
) -> torch.Tensor:
    """``(B, L, len(layers) * D)``: the hidden states of ``layers`` (indices into
    ``output_hidden_states``) concatenated along features, in the order given."""
    device = next(model.parameters()).device
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False
    )
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)
