"""T5 encoders (T5-XXL for Flux.1 and SD3) as transformers ``T5EncoderModel``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffcore.text_encoders.config import T5Config
from diffcore.text_encoders.encoder import Encoded, TextEncoder
from diffcore.text_encoders.sources import Source
from diffcore.weights import empty_weights, load_into

PRESET: dict[str, Any] = dict(  # T5-XXL (v1.1), the encoder of Flux.1 and SD3
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
)  # fmt: skip
PREFIXES = ("", "text_encoders.t5xxl.transformer.")
ANCHORS = ("encoder.block.0.layer.0.SelfAttention.q.weight",)
_ENCODER_ONLY = dict(is_encoder_decoder=False, use_cache=False)


def _count(keys: list[str], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _shape(source: Source) -> dict[str, Any]:
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = source.shape(attention + "relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in source
    embedding = "shared.weight" if "shared.weight" in source else "encoder.embed_tokens.weight"
    vocab, d_model = source.shape(embedding)
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_ff=source.shape(
            "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
        )[0],
        d_kv=source.shape(attention + "q.weight")[0] // heads,
        num_heads=heads,
        num_layers=_count(source.keys(), "encoder.block."),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def t5_config(options: dict[str, Any], source: Source | None = None) -> Any:
    from transformers import T5Config as HFT5Config

    if source is None:
        fields = dict(PRESET)
    elif source.config is not None:
        fields = dict(source.config)
    else:
        fields = _shape(source)
    return HFT5Config(**{**fields, **options, **_ENCODER_ONLY})


def random_t5(config: T5Config) -> nn.Module:
    from transformers import T5EncoderModel

    return T5EncoderModel(t5_config(config.options)).eval()


def load_t5(source: Source, config: T5Config, dtype: torch.dtype) -> nn.Module:
    from transformers import T5EncoderModel

    with empty_weights():
        model = T5EncoderModel(t5_config(config.options, source))
    has_shared = "shared.weight" in source

    def rename(key: str) -> str | None:
        # the token embedding is one tensor tied between shared and encoder.embed_tokens; files
        # hold it under either name (or both)
        if key == "encoder.embed_tokens.weight":
            return None if has_shared else "shared.weight"
        return key

    load_into(model, source.items(), where=source.where, dtype=dtype, rename=rename)
    model.set_input_embeddings(model.shared)  # filling shared.weight replaced the tied parameter
    return model.eval()


class T5Encoder(TextEncoder):
    """T5: ``hidden`` the last hidden state over the padded sequence; no pooled output."""

    config: T5Config

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._padded(captions, self.config.max_length)

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        given = mask.to(self.device) if self.config.attention_mask else None
        hidden = self.model(ids.to(self.device), attention_mask=given).last_hidden_state
        return Encoded(hidden, None, mask)
