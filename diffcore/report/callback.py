"""The ``report`` callback (``diffcore run --report``): keeps ``report.html`` current while training."""

from __future__ import annotations

import logging
import time
from typing import Any

from diffcore.callbacks.base import Callback
from diffcore.errors import UserError

log = logging.getLogger("diffcore.report")


class ReportCallback(Callback):
    """Rewrites the page (rank 0 only) at logged steps at most every ``every_s`` seconds, and always
    after a checkpoint, at a step that wrote samples, at the end and when the run stops on an error."""

    def __init__(self, config: Any):
        self.every_s = float(config.every_s)
        self.last = -float("inf")
        self.memo: dict[tuple[str, int], tuple[str, bool]] = {}

    def on_train_start(self, ctx: Any) -> None:
        self._write(ctx)

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        if not ctx.is_main:
            return
        sampled = (ctx.output_dir / "samples" / f"step-{ctx.step}").is_dir()
        if sampled or (logs is not None and time.monotonic() - self.last >= self.every_s):
            self._write(ctx)

    def on_checkpoint(self, ctx: Any, path: Any) -> None:
        self._write(ctx)

    def on_train_end(self, ctx: Any) -> None:
        self._write(ctx)

    def on_exception(self, ctx: Any, exc: BaseException) -> None:
        self._write(ctx)

    def _write(self, ctx: Any) -> None:
        if not ctx.is_main:
            return
        from diffcore.report.write import write_report

        try:
            write_report(ctx.output_dir, intact_memo=self.memo)
        except (OSError, UserError) as exc:  # a report is never worth stopping a run for
            log.warning("report.html not updated: %s", exc)
        self.last = time.monotonic()
