"""Config of the built-in ``synthetic`` dataset (torch-free: the registry imports it cheaply)."""

from __future__ import annotations

import attrs

#: every class the synthetic dataset can draw: (name, hue in degrees, shape); each has its own
#: colour and its own form, so the class can be measured back from the pixels
CATALOGUE: tuple[tuple[str, float, str], ...] = (
    ("red circle", 0.0, "circle"),
    ("green square", 120.0, "square"),
    ("blue triangle", 235.0, "triangle"),
    ("yellow cross", 55.0, "cross"),
    ("magenta ring", 300.0, "ring"),
    ("cyan diamond", 180.0, "diamond"),
)
DEFAULT_CLASSES = 4


@attrs.define(kw_only=True)
class SyntheticConfig:
    """Procedurally drawn labelled images: one saturated shape on a dark background; no download."""

    resolution: int = 32
    #: number of items (each is drawn from (seed, index) when read)
    size: int = 4096
    #: class names from the catalogue (default: the first four)
    classes: list[str] | None = None
    seed: int = 0

    def class_names(self) -> list[str]:
        return list(self.classes) if self.classes else [name for name, _, _ in CATALOGUE[:DEFAULT_CLASSES]]
