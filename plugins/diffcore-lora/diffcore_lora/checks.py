"""What an adapter job cannot train with, found before a model loads (``AdapterSpec.validate``).
Imports no torch: ``diffcore validate`` runs it."""

from __future__ import annotations

from typing import Any

from diffcore.errors import Problem


def validate(job: Any) -> list[Problem]:
    """Text encoders that train cannot be fed from a feature cache: the cache holds what the frozen
    encoders computed before training, so their adapter layers would never be read and never learn."""
    text_encoders = job.adapter.config.text_encoders
    # every built-in image dataset has cache_dir; a plugin dataset without one has no cache
    if text_encoders and getattr(job.data.config, "cache_dir", None):
        return [
            Problem(
                "$.data.cache_dir",
                f"the adapter trains text encoders ($.adapter.text_encoders: {text_encoders}), whose outputs a "
                "feature cache would freeze; remove cache_dir, or set text_encoders: false",
            )
        ]
    return []
