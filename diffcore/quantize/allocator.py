"""Keeping glibc from holding on to the memory a quantised load frees."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from typing import Any

# mallopt's parameter for the size from which an allocation gets a mapping of its own (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_WHILE_LOADING = 256 << 10
# glibc's own ceiling for the threshold it raises by itself (64-bit), where a long run ends up anyway
_AFTER = 32 << 20


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A quantised load reads, quantises and frees one tensor after another while the small quantised
    copies it keeps sit between them on the heap; glibc keeps such holes resident, so without this
    the freed full-precision tensors would add up in the process's memory."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def mapped_allocations() -> Iterator[None]:
    """While inside, every allocation of 256 KiB or more gets a mapping of its own, unmapped when it
    is freed: the full-precision tensors a quantised load reads and drops never sit on the heap
    between the quantised copies it keeps. glibc would otherwise raise that threshold by itself after
    the first large free, and how much the heap then holds varies from run to run. Setting it turns
    glibc's own adjustment off for the process, so on leaving it is set to where that adjustment
    ends (32 MiB). Nothing happens off glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _WHILE_LOADING)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER)
