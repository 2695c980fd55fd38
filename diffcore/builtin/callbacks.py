"""Built-in callbacks (records only; no torch at import)."""

from __future__ import annotations


def records() -> list:
    return []
