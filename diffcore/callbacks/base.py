"""The callback interface (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffcore.training.context import TrainContext


class Callback:
    """Override what you need. Every method runs on every rank; use ``ctx.is_main`` to write once.

    ``on_step_end`` gets the logged values of the step (``step``, ``loss``, ``lr``,
    ``samples_per_sec``, ``elapsed_s`` and what the method reported).
    """

    def on_train_start(self, ctx: TrainContext) -> None:
        pass

    def on_step_end(self, ctx: TrainContext, logs: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, ctx: TrainContext, path: Path) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        pass

    def on_exception(self, ctx: TrainContext, exc: BaseException) -> None:
        pass
