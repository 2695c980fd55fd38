"""A callback that stalls one rank, registered in a child run by tests/test_multinode.py."""

from __future__ import annotations

import attrs

import diffcore


@attrs.define(kw_only=True)
class StallConfig:
    rank: int = 1
    at_step: int = 2
    seconds: float = 120.0


def _stall(config: StallConfig):
    import time

    from diffcore.callbacks.base import Callback

    class Stall(Callback):
        def on_step_end(self, ctx, logs):
            if ctx.rank == config.rank and ctx.step == config.at_step:
                time.sleep(config.seconds)

    return Stall()


@diffcore.hookimpl
def diffcore_register_callbacks():
    return [diffcore.CallbackSpec(name="stall", config=StallConfig, factory=_stall)]
