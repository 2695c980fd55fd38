"""Peak CPU memory of one call, measured in a fresh process (shared by the benchmark scripts).

The parent re-runs the benchmark script with extra arguments in a child whose glibc returns every
large block to the system, so the resident set follows the live tensors; the child warms the call
up, resets the kernel's high-water mark and reports how far one more call raised it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_in_child(extra_argv: list[str]) -> int:
    """Run this script again with ``extra_argv`` (which must end in :func:`report_peak`); bytes."""
    argv = [sys.argv[0], *sys.argv[1:], *extra_argv]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak"])


def report_peak(fn: Callable[[], object]) -> None:
    """In the child: warm ``fn`` up, then print the peak extra memory of one more call."""
    fn()  # optimizer state, lazily built kernels and caches exist from here on
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    fn()
    print(json.dumps({"peak": (_status_kib("VmHWM") - base) * 1024}))
