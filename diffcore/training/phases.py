"""What a run is doing: quiet start-up, a line per slow start-up phase, and a warning when it stalls.

Third-party start-up chatter (DeepSpeed's op build lines, compiler output, its logger's warnings) is
captured at the file-descriptor level, so subprocesses such as the op builder are covered too, and
shown only with ``--debug`` or when the phase fails (so nothing that explains a failure is lost).
A watchdog thread warns once per stall when no phase or step has finished for
``train.stall_warning_s`` seconds, naming what the run was doing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

DEBUG_ENV = "DIFFCORE_DEBUG"
#: phases shorter than this print nothing; longer ones say when they are done
_SLOW_S = 2.0


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV) == "1"


@contextlib.contextmanager
def captured_output() -> Iterator[None]:
    """Hold back what is written to stdout/stderr (by Python or by child processes) inside; replay
    it if the block raises. A no-op with ``--debug``."""
    if debugging():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        loggers = [logging.getLogger(name) for name in ("DeepSpeed", "deepspeed")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))
                sys.stderr.flush()


class Phases:
    """The current phase of a run, its start-up messages on rank 0, and the stall watchdog."""

    def __init__(self, *, main: bool, stall_after_s: float | None):
        self.main = main
        self.name = "starting"
        self._since = time.monotonic()
        self._stall_after = stall_after_s
        self._warned_for: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Phases:
        if self._stall_after:
            self._thread = threading.Thread(target=self._watch, name="diffcore-stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def enter(self, name: str) -> None:
        """Progress: the run moved on to ``name`` (a step, a checkpoint, a callback...)."""
        self.name = name
        self._since = time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str, *, quiet: bool = True) -> Iterator[None]:
        """A start-up phase: announced on rank 0 when it is slow, its third-party output held back."""
        self.enter(name)
        started = time.monotonic()
        with captured_output() if quiet else contextlib.nullcontext():
            yield
        took = time.monotonic() - started
        if self.main and took >= _SLOW_S:
            print(f"diffcore: {name}: {took:.1f} s", file=sys.stderr, flush=True)
        self.enter(f"setting up, after {name}")

    def _watch(self) -> None:
        assert self._stall_after is not None
        while not self._stop.wait(min(5.0, self._stall_after / 4)):
            since = self._since
            idle = time.monotonic() - since
            if idle >= self._stall_after and self._warned_for != since:
                self._warned_for = since
                print(
                    f"diffcore: warning: no progress for {idle:.0f} s while {self.name} "
                    "(train.stall_warning_s sets when this is said)",
                    file=sys.stderr,
                    flush=True,
                )
