"""``report.html``: one static page of a run (curves, samples, job, plugins, checkpoints), offline.

:func:`write_report` reads an output directory and writes ``report.html`` into it atomically; the
page links its images relatively, so it stays small and opens from disk as well as over ``--serve``.
"""

from __future__ import annotations

from diffcore.report.write import write_report

__all__ = ["write_report"]
