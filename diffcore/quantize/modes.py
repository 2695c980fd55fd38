"""The quantisation modes, which library does each, and what each runs on (torch-free)."""

from __future__ import annotations

from typing import Literal

import attrs

Mode = Literal["none", "int8", "fp8", "nf4"]
MODES: tuple[str, ...] = ("none", "int8", "fp8", "nf4")


@attrs.frozen
class Library:
    """What does one mode: the import name, the pip requirement that provides it, and a summary."""

    module: str
    pip: str
    summary: str


_TORCHAO = "torchao"
_PIP = "diffcore[quant]"

LIBRARIES: dict[str, Library] = {
    "int8": Library(_TORCHAO, _PIP, "int8 weight-only, one scale per output row (torchao Int8WeightOnlyConfig)"),
    "fp8": Library(_TORCHAO, _PIP, "float8 e4m3 weight-only, one scale per output row (torchao Float8WeightOnlyConfig)"),
    "nf4": Library(_TORCHAO, _PIP, "4-bit NormalFloat, blocks of 64 with double-quantised scales (torchao NF4Tensor)"),
}


def library_for(mode: str) -> Library:
    """The library that does ``mode`` (not ``none``)."""
    return LIBRARIES[mode]
