"""The default method's config (torch-free: plugin discovery imports it)."""

from __future__ import annotations

from typing import Literal

import attrs


@attrs.define(kw_only=True)
class DiffusionMethodConfig:
    """The default method: train the model's ``prediction_type`` objective with the job's scheduler."""

    #: share of examples whose conditioning is dropped (captions emptied, null class), for guidance
    condition_dropout: float = 0.0
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = 1.0
