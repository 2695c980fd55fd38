"""Keeping glibc from holding on to the memory a quantised load frees."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any


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
