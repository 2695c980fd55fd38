"""Safe interrupts: SIGINT (Ctrl-C) and SIGTERM (what schedulers send) stop a run at a step boundary.

The first signal asks the loop to finish the current step, write a checkpoint and stop; the run then
exits with 130 (SIGINT) or 143 (SIGTERM), the shell's numbers for those signals, after printing how to
resume. A second signal aborts at once. With several processes the ranks agree on stopping at the
next logged step (a collective at a fixed cadence, so no rank waits on another that did not hear it).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from diffcore.errors import DiffcoreError

#: the exit status of a run stopped by each signal (128 + signal number, as a shell reports it)
EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}


class RunInterrupted(DiffcoreError):
    """A run stopped on request, with its checkpoint written."""

    def __init__(self, signame: str, step: int, checkpoint: Any, message: str):
        self.signame = signame
        self.step = step
        self.checkpoint = checkpoint
        self.exit_status = EXIT_STATUS.get(signame, 130)
        super().__init__(message)


class StopRequest:
    """Signal handlers for the life of a run; :attr:`signame` is set once a stop was asked for."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        # signal handlers can only be set from the main thread (a run driven from another thread,
        # e.g. a notebook's worker, keeps the default behaviour)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None:
            print(f"diffcore: {name} again: aborting now, without a checkpoint", file=sys.stderr, flush=True)
            self.uninstall()
            raise KeyboardInterrupt
        self.signame = name
        print(
            f"diffcore: {name}: finishing this step, then writing a checkpoint and stopping "
            f"({'Ctrl-C' if name == 'SIGINT' else 'the signal'} again aborts at once)",
            file=sys.stderr,
            flush=True,
        )
