"""Tiny tokenizers made in the test, for text-encoder parity tests: nothing is downloaded.

Each builds a real transformers tokenizer of the kind a pipeline ships (CLIP BPE, T5 unigram, a chat
LLM's fast tokenizer) over a few dozen pieces, so diffcore and the reference pipeline tokenize the same
captions the same way. Needs transformers and tokenizers (test-only use)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: the words :func:`llm_tokenizer` knows (captions in tests use only these)
WORDS = ("a", "the", "cat", "dog", "sat", "on", "mat", "by")


def clip_tokenizer(pad: str = "<|endoftext|>", punctuation: str = "") -> Any:
    """A CLIP BPE tokenizer: BOS 0, EOS 1, then ``punctuation``, the letters, the letters as word ends,
    and merges that make "cat" and "dog" single tokens. ``pad`` is its pad token (CLIP-G pads with "!",
    which must then be in ``punctuation``)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in punctuation:
        vocab[c] = len(vocab)
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad)  # type: ignore[arg-type]


def t5_tokenizer(words: Sequence[str] = ("cat", "dog")) -> Any:
    """A T5 unigram tokenizer (pad 0, EOS 1, unk 2) over letters, with ``words`` as whole pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in LETTERS] + [(c, -3.0) for c in LETTERS]
    pieces += [("\u2581" + w, -1.0) for w in words]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


# Renders plain or part-list content; shows the generation prompt and the thinking switch as tokens
# so that passing them wrongly changes the ids.
_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] "
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
    " [end] {% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}[nothink]{% endif %}"
)


def llm_tokenizer(bos: bool, words: Sequence[str] = WORDS) -> Any:
    """A word-level chat tokenizer (Mistral/Qwen3-like) over ``words`` whose chat template shows every
    switch as a token; ``bos``: the template starts with the BOS token, as Mistral's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[pad]", "[unk]", "[bos]", "[system]", "[user]", "[end]", "[assistant]", "[nothink]"]
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[pad]", unk_token="[unk]", bos_token="[bos]", model_max_length=64
    )
    tok.chat_template = ("[bos] " if bos else "") + _TEMPLATE
    return tok
