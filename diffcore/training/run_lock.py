"""One writer per output directory: a lock that a live run holds and a crash cannot leave stuck.

The lock is ``OUTPUT_DIR/.diffcore-run.lock``, held with ``flock`` for the life of the process, so
the kernel releases it when the process dies however it dies (SIGKILL included). The file records
who holds it (pid, host, start time) so that a refused run can name the live one, and a run that
finds a file nobody holds knows a crashed run left it and takes it over. Readers (``diffcore
sample``, ``cache``, ``report``) never take it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from diffcore.errors import UserError

LOCK = ".diffcore-run.lock"


class RunLock:
    """A held lock; :meth:`release` (or process exit) lets the next run in."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        found = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        found = {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _os_error(output_dir: Path, exc: OSError, doing: str) -> UserError:
    reasons = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
               errno.EPERM: "is not writable", errno.ENOSPC: "is on a full disk",
               errno.ENOTDIR: "has a file where a folder is needed"}
    reason = reasons.get(exc.errno or 0, f"cannot be used ({exc.strerror or exc})")
    return UserError(f"output_dir {reason} (while {doing})", where=str(output_dir),
                     hint="choose an output_dir on a writable disk")


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output_dir that cannot be a run's folder, before anything is written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError("output_dir is a file, not a folder", where=str(output_dir),
                        hint="choose another output_dir, or move the file away")
    for parent in output_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output_dir cannot be created: {parent} is a file", where=str(output_dir),
                                hint="choose another output_dir")
            break


def acquire(output_dir: Path) -> RunLock:
    """Take ``output_dir``'s lock (creating the folder), or refuse naming the live run that holds it."""
    check_output_dir(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(output_dir, exc, "creating it") from None
    path = output_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error(output_dir, exc, f"creating {LOCK}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"another run is writing to this output_dir ({_describe(holder)})",
                where=str(output_dir),
                hint="wait for it to finish or stop it, or choose another output_dir",
            ) from None
        # the holder we waited on may have released and unlinked the file meanwhile: lock the live one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(fd)
    if stale:
        print(f"diffcore: note: took over the lock of a run that ended without releasing it ({_describe(stale)})",
              file=sys.stderr, flush=True)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine.encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise _os_error(output_dir, exc, f"writing {LOCK}") from None
    return RunLock(fd, path)
