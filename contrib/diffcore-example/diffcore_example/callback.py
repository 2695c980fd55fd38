"""A callback: append every logged loss to a text file (rank 0 only)."""

from __future__ import annotations

from diffcore.callbacks import Callback


class LossHistory(Callback):
    def __init__(self, config):
        self.filename = config.filename

    def on_step_end(self, ctx, logs):
        if ctx.is_main and logs is not None:
            with open(ctx.output_dir / self.filename, "a", encoding="utf-8") as f:
                f.write(f"{logs['step']} {logs['loss']:.6f}\n")
