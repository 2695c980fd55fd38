"""Line charts as inline SVG: no script and no library, so the page draws offline in any browser."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import attrs

WIDTH, HEIGHT = 420, 230
LEFT, RIGHT, TOP, BOTTOM = 58, 10, 14, 34


@attrs.frozen
class Series:
    label: str
    points: list[tuple[float, float]]
    colour: str
    width: float = 1.5
    opacity: float = 1.0


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with the start-up bias removed (the first points are not pulled to 0)."""
    out, running, norm = [], 0.0, 0.0
    for value in values:
        running = weight * running + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(running / norm)
    return out


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def line_chart(title: str, series: list[Series], *, x_label: str = "step") -> str:
    """One SVG chart of ``series`` sharing axes; an empty chart says there is nothing to draw."""
    points = [p for s in series for p in s.points]
    head = (
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
    )
    if not points:
        return head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no {escape(title)} logged yet</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [head, f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    for x in _ticks(x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{_label(x)}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 3}" text-anchor="middle">{escape(x_label)}</text>')
    for s in series:
        if not s.points:
            continue
        if len(s.points) == 1:
            x, y = s.points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.colour}"/>')
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{s.colour}" stroke-width="{s.width}" '
            f'stroke-opacity="{s.opacity}" stroke-linejoin="round"><title>{escape(s.label)}</title></polyline>'
        )
    legend_x = LEFT + 8
    for s in series:
        parts.append(f'<rect x="{legend_x}" y="{TOP + 6}" width="10" height="10" fill="{s.colour}" fill-opacity="{s.opacity}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{TOP + 15}">{escape(s.label)}</text>')
        legend_x += 24 + 7 * len(s.label)
    parts.append("</svg>")
    return "".join(parts)
