"""The ``method: {type: textual_inversion}`` section (torch-free: plugin discovery imports it)."""

from __future__ import annotations

import attrs

from diffcore.methods.config import DiffusionMethodConfig


@attrs.define(kw_only=True)
class TextualInversionConfig(DiffusionMethodConfig):
    """New tokens whose embedding vectors train; the model and its encoders stay frozen (an adapter,
    when the job has one, trains beside them: pivotal tuning)."""

    #: the token captions use for the concept, e.g. "<my-cat>"; it must not exist in any tokenizer
    placeholder_token: str
    #: a word whose token embedding(s) start the new vectors, e.g. "cat"
    initializer_token: str
    #: vectors per text encoder; more than one adds "<tok>_1" ... and captions are expanded to them
    num_vectors: int = 1
    #: the model's token tables to extend (default: every one, e.g. clip_l and clip_g on SDXL)
    tables: list[str] | None = None
