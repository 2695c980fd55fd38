"""``control-shapes``: diffcore's synthetic shapes, each with its outline as the control image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import diffcore
from diffcore_controlnet_example.plugin import ControlShapesConfig


def outline(pixels: torch.Tensor) -> torch.Tensor:
    """The edge of the bright shape in ``pixels`` (3, H, W) in [-1, 1], drawn white on black as a
    3-channel image in [-1, 1] (what an edge detector gives a ControlNet)."""
    shape = (pixels.max(dim=0).values > -0.3).float()[None, None]
    inner = -F.max_pool2d(-shape, 3, stride=1, padding=1)  # erosion
    edge = (shape - inner)[0]
    return (edge * 2 - 1).expand(3, -1, -1).contiguous()


class ControlShapes:
    """Map-style dataset of ``{"pixels", "labels", "captions", "control"}``."""

    def __init__(self, config: ControlShapesConfig, build: Callable[[dict[str, Any], str], Any] | None = None):
        shapes = {"resolution": config.resolution, "size": config.size, "classes": config.classes, "seed": config.seed}
        if build is not None:  # the kernel hands dataset factories a builder for nested sections
            self.shapes = build({"type": "synthetic", **shapes}, "$.data")
        else:
            self.shapes = diffcore.build_component("dataset", "synthetic", shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.shapes[index])
        item["control"] = outline(item["pixels"])
        return item
