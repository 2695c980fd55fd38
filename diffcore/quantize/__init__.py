"""A quantised frozen base (``model.quantize: none | int8 | fp8 | nf4``).

The frozen backbone's and text encoders' Linear weights are quantised tensor by tensor while they
stream from the file (:mod:`diffcore.quantize.streaming`), through torchao (:mod:`diffcore.quantize.library`).
Adapters train on top; a plugin that reads a base weight as a whole (a weight-space adapter, DoRA's
norm) calls :func:`diffcore.quantize.tensors.dense`. Importing this package does not import torch.
"""

from __future__ import annotations

from diffcore.quantize.modes import MODES, Mode, library_for

__all__ = ["MODES", "Mode", "library_for"]
