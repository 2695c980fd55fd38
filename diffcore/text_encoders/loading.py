"""Loading a text encoder of any family: its model (meta device, streamed in the chosen dtype) and
its tokenizer."""

from __future__ import annotations

from typing import Any

from torch import nn

from diffcore.dtypes import torch_dtype
from diffcore.errors import UserError
from diffcore.text_encoders import clip, llm, t5
from diffcore.text_encoders.config import CONFIGS, FAMILIES, ClipConfig, EncoderConfig, LLMConfig, T5Config
from diffcore.text_encoders.encoder import TextEncoder
from diffcore.text_encoders.sources import Source, load_tokenizer, locate, tokenizer_folder


def _family(family: str, config: EncoderConfig) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown text encoder family {family!r}", hint=f"known: {', '.join(FAMILIES)}")
    if not isinstance(config, CONFIGS[family]):
        raise TypeError(
            f"the {family} text encoder takes a {CONFIGS[family].__name__}, not {type(config).__name__}"
        )


def locate_weights(family: str, config: EncoderConfig) -> Source:
    """Where ``config.pretrained`` keeps this family's tensors (folder or single file, key prefix)."""
    _family(family, config)
    if isinstance(config, ClipConfig):
        return locate(config, family, clip.PREFIXES[family], clip.ANCHORS)
    if isinstance(config, T5Config):
        return locate(config, family, t5.PREFIXES, t5.ANCHORS)
    return locate(config, family, llm.PREFIXES[family], llm.ANCHORS)


def load_model(family: str, config: EncoderConfig) -> nn.Module:
    """The transformers model named by ``config.pretrained``, built on the meta device and filled
    tensor by tensor in ``config.dtype`` (in eval mode). Without ``pretrained``, a random model from
    the family preset and ``config.options`` (for tests and from-scratch runs)."""
    _family(family, config)
    if config.pretrained is None:
        if isinstance(config, ClipConfig):
            model = clip.random_clip(family, config)
        elif isinstance(config, T5Config):
            model = t5.random_t5(config)
        else:
            assert isinstance(config, LLMConfig)
            model = llm.random_llm(family, config)
        return model.to(torch_dtype(config.dtype))
    dtype = torch_dtype(config.dtype)
    source = locate_weights(family, config)
    if isinstance(config, ClipConfig):
        return clip.load_clip(source, family, config, dtype)
    if isinstance(config, T5Config):
        return t5.load_t5(source, config, dtype)
    assert isinstance(config, LLMConfig)
    return llm.load_llm(source, family, config, dtype)


_ENCODERS: dict[type[EncoderConfig], type[TextEncoder]] = {
    ClipConfig: clip.ClipEncoder,
    T5Config: t5.T5Encoder,
    LLMConfig: llm.LLMEncoder,
}


def load_text_encoder(family: str, config: EncoderConfig, *, tokenizer: Any = True) -> TextEncoder:
    """Model and tokenizer of one family. ``tokenizer``: True finds the folder (``config.tokenizer`` or
    beside the weights), False loads none, or a tokenizer object to use as is."""
    model = load_model(family, config)
    if tokenizer is True:
        tokenizer = load_tokenizer(tokenizer_folder(config, family))
    elif tokenizer is False:
        tokenizer = None
    kind = next(cls for base, cls in _ENCODERS.items() if isinstance(config, base))
    encoder = kind(model, tokenizer, config)
    encoder.family = family
    return encoder
