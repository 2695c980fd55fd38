"""Writing ``report.html`` atomically, so a browser refreshing mid-run never reads half a page."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from diffcore.report.collect import collect
from diffcore.report.page import render

REPORT = "report.html"


def write_report(output_dir: str | Path, *, intact_memo: dict[tuple[str, int], tuple[str, bool]] | None = None) -> Path:
    """Write ``output_dir/report.html`` and return its path; raises UserError if it is not a run."""
    folder = Path(output_dir)
    page = render(collect(folder, intact_memo=intact_memo))
    target = folder / REPORT
    tmp = folder / f".{REPORT}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
