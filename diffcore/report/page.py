"""The report page: :class:`RunFiles` as one self-contained HTML document (images linked relatively)."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from typing import Any
from urllib.parse import quote

from diffcore.report.charts import Series, line_chart, smooth
from diffcore.report.collect import RunFiles, SampleFolder

LOSS_RAW, LOSS_SMOOTH, LR, THROUGHPUT = "#9ecae1", "#d62728", "#2ca02c", "#1f77b4"
#: text chunks shown first under an image, in this order; any others follow
TEXT_ORDER = ("label", "prompt", "caption", "seed", "sampler", "steps", "guidance", "weights")

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px 20px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:14px 0 6px}.muted{color:#666}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:12px}
svg.chart{background:#fff;font-size:11px;fill:#444;width:100%;height:auto}svg.chart .plot{fill:#fafafa;stroke:#ccc}
svg.chart .grid{stroke:#e4e4e4}svg.chart .empty{fill:#999;font-size:13px}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:10px}
figure{margin:0}figure img{width:100%;height:auto;image-rendering:pixelated;border:1px solid #ddd;background:#eee}
figcaption{font-size:11px;color:#333;word-break:break-word}figcaption b{font-weight:600}
.missing{font-size:11px;color:#b00;border:1px dashed #b00;padding:6px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#b00}.ok{color:#070}
pre{background:#f6f6f6;border:1px solid #e2e2e2;padding:8px;overflow:auto;max-height:480px;font-size:12px}
"""

# An image that fails to load says so in the page instead of leaving a broken icon.
SCRIPT = """
function missing(img){var s=document.createElement('div');s.className='missing';
s.textContent='image not found: '+img.getAttribute('src');img.replaceWith(s);}
"""


def render(run: RunFiles) -> str:
    """The whole page."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    last = run.metrics[-1] if run.metrics else {}
    done = last.get("step", 0)
    of = f" of {run.total_steps}" if run.total_steps else ""
    summary = [f"step {done}{of}"]
    if isinstance(last.get("loss"), (int, float)):
        summary.append(f"loss {last['loss']:.4g}")
    if isinstance(last.get("elapsed_s"), (int, float)):
        summary.append(f"{last['elapsed_s']:.0f} s elapsed")
    body = [
        f"<h1>{escape(run.name)}</h1>",
        f'<div class="muted">{escape(str(run.output_dir))} &middot; {escape(", ".join(summary))} &middot; written {now}</div>',
        "<h2>Training curves</h2>",
        _charts(run.metrics),
        *(["<h2>Quality</h2>", _quality(run.quality)] if run.quality else []),
        "<h2>Samples</h2>",
        _samples(run.samples, run.older_samples),
        "<h2>Checkpoints</h2>",
        _checkpoints(run),
        "<h2>Plugins</h2>",
        _versions(run),
        "<h2>Job</h2>",
        f"<pre>{escape(run.job_text) or 'job.yaml is not written yet'}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(run.name)}: diffcore report</title>"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>'
        f"<script>{SCRIPT}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


#: points drawn per line at most: a long run's thousands of logged steps thinned evenly (a browser
#: draws a polyline of 1000 points as well as one of 100 000, and the page stays small)
MAX_POINTS = 1000


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = (len(points) - 1) / (MAX_POINTS - 1)
    return [points[round(i * stride)] for i in range(MAX_POINTS)]


def _column(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _charts(rows: list[dict[str, Any]]) -> str:
    loss = _column(rows, "loss")
    smoothed = list(zip([x for x, _ in loss], smooth([y for _, y in loss])))
    charts = [
        line_chart("loss", [Series("loss", _thin(loss), LOSS_RAW, 1.2), Series("smoothed (EMA 0.9)", _thin(smoothed), LOSS_SMOOTH, 2.0)]),
        line_chart("learning rate", [Series("lr", _thin(_column(rows, "lr")), LR, 2.0)]),
        line_chart("throughput", [Series("samples/s", _thin(_column(rows, "samples_per_sec")), THROUGHPUT, 2.0)]),
    ]
    return '<div class="charts">' + "".join(charts) + "</div>"


def _quality(figures: dict[str, Any]) -> str:
    """quality.json as a table: its numbers, and a nested mapping (per class) as one cell."""
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict):
            shown = ", ".join(f"{escape(str(k))} {v:.2f}" if isinstance(v, float) else f"{escape(str(k))} {escape(str(v))}" for k, v in value.items())
        elif isinstance(value, float):
            shown = f"{value:.3f}"
        else:
            shown = escape(str(value))
        rows.append(f"<tr><td>{escape(key.replace('_', ' '))}</td><td>{shown}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _caption(text: dict[str, str], fallback: str) -> str:
    if not text:
        return escape(fallback)
    keys = [k for k in TEXT_ORDER if k in text] + sorted(k for k in text if k not in TEXT_ORDER)
    return "<br>".join(f"<b>{escape(k)}</b> {escape(text[k])}" for k in keys)


def _folder(folder: SampleFolder) -> str:
    title = "final" if folder.step is None else f"step {folder.step}"
    figures = []
    for image in folder.images:
        name = image.path.rsplit("/", 1)[-1]
        figures.append(
            f'<figure><img src="{quote(image.path)}" width="{image.width}" height="{image.height}" '
            f'alt="{escape(name)}" loading="eager" onerror="missing(this)">'
            f"<figcaption>{_caption(image.text, name)}</figcaption></figure>"
        )
    more = f'<p class="muted">and {folder.more} more in samples/{escape(folder.name)}/</p>' if folder.more else ""
    return f'<h3>{title}</h3><div class="samples">{"".join(figures)}</div>{more}'


def _samples(folders: list[SampleFolder], older: int) -> str:
    if not folders:
        return '<p class="muted">no samples yet (the sample callback writes samples/step-N/)</p>'
    # newest first: the page is mostly read to see how the run is doing now
    more = f'<p class="muted">and {older} older sample folders in samples/</p>' if older else ""
    return "".join(_folder(f) for f in reversed(folders)) + more


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _checkpoints(run: RunFiles) -> str:
    if not run.checkpoints:
        return '<p class="muted">no checkpoints on disk</p>'
    rows = "".join(
        f'<tr><td class="num">{c.step}</td><td>{escape(c.path)}</td><td class="num">{_size(c.size)}</td>'
        f'<td>{escape(c.written)}</td><td class="{"ok" if c.intact else "bad"}">{escape(c.state)}</td></tr>'
        for c in reversed(run.checkpoints)
    )
    return f"<table><tr><th>step</th><th>folder</th><th>size</th><th>written</th><th>state</th></tr>{rows}</table>"


def _versions(run: RunFiles) -> str:
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in sorted(run.versions.items()))
    return (
        f'<p class="muted">from {escape(run.versions_from)}</p>'
        f"<table><tr><th>distribution</th><th>version</th></tr>{rows}</table>"
    )
