"""The callback interface (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffcore.context import TrainContext


class Callback:
    """Override what you need. Every method runs on every rank; use ``ctx.is_main`` to write once.

    ``on_step_end`` gets the logged values of the step (``step``, ``loss``, ``lr``,
    ``samples_per_sec``, ``elapsed_s`` and what the method reported, each averaged over the
    logging window), or None on steps that are not logged. ``on_checkpoint`` runs after a
    checkpoint is complete and renamed into place; state a callback needs back on resume belongs in
    ``state_dict``, which the kernel writes inside the checkpoint before the rename.
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

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors and JSON values), written before the checkpoint's atomic rename."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes."""
