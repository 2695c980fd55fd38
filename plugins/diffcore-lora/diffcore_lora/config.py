"""Configuration of the adapter kinds (the keys of a job's ``adapter`` section). Torch-free."""

from __future__ import annotations

from typing import Any, Literal

import attrs


def _text_encoders(value: Any) -> bool | list[str]:
    # A job may say `text_encoders: true` (every frozen text encoder) or name them: [te1, te2].
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"text_encoders must be true, false or a list of names like ['te1'], got {value!r}")


def _probability(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value}")


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.define(kw_only=True)
class AdapterConfig:
    """What every adapter kind shares.

    ``targets``/``exclude`` are regexes searched (``re.search``) in the dotted names of the
    backbone's Linear and Conv2d layers; ``targets`` defaults to the model's ``adapter_targets``.
    ``alpha`` defaults to ``rank`` (scale 1). ``dtype`` "auto" keeps each adapter in its layer's dtype.
    """

    rank: int = attrs.field(default=16, validator=_positive)
    alpha: float | None = None
    dropout: float = attrs.field(default=0.0, validator=_probability)
    rank_dropout: float = attrs.field(default=0.0, validator=_probability)
    module_dropout: float = attrs.field(default=0.0, validator=_probability)
    targets: list[str] | None = None
    exclude: list[str] = attrs.field(factory=list)
    text_encoders: Any = attrs.field(default=False, converter=_text_encoders)
    text_encoder_targets: list[str] = attrs.field(
        factory=lambda: [
            r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",
            r"(\.q|\.k|\.v|\.o|\.wi|\.wi_0|\.wi_1|\.wo)$",
        ]
    )
    save_format: Literal["kohya", "peft"] = "kohya"
    peft_prefix: str | None = None
    strength: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    name: str | None = None

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@attrs.define(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA: dW = up @ down * alpha / rank. ``init`` "default" is PEFT's (Kaiming-uniform down, zero
    up); "gaussian" draws down from N(0, 1/rank)."""

    init: Literal["default", "gaussian"] = "default"


@attrs.define(kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA: LoRA direction plus a trained per-output magnitude (saved as ``dora_scale``)."""


@attrs.define(kw_only=True)
class LokrConfig(AdapterConfig):
    """LoKr (LyCORIS): dW = kron(w1, w2) * alpha / rank.

    ``factor`` picks the Kronecker split (-1: most square). ``decompose_both`` factors w1 too;
    ``full_matrix`` keeps w2 a full matrix; ``use_tucker`` uses a Tucker core for conv kernels.
    """

    rank: int = attrs.field(default=16, validator=_positive)
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_tucker: bool = False


@attrs.define(kw_only=True)
class LohaConfig(AdapterConfig):
    """LoHa (LyCORIS): dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank."""
