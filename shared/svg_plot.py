"""Small SVG charts (bars and lines) for the audit report (``shared.audit_report``), standard library only.

Why not matplotlib: ``fl-audit`` lives in ``shared``, which an auditor installs without the
plotting stack (``shared`` needs numpy, msgpack and cryptography only, and runs on a Jetson).
Every label is escaped: device names, series names and titles can come from ledgers and logs,
which are untrusted input. A chart is a complete SVG document with a fixed pixel size, so it can
be embedded as an ``<img>`` data URI, where a browser neither runs scripts nor loads anything.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 180, 34, 48  # the right margin holds the legend
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MAX_LEGEND = 12  # more series than this are drawn but listed as "+N more", so the legend stays inside the chart


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _ticks(top: float) -> tuple[float, float]:
    """A round axis maximum at or above ``top`` and a step giving about five gridlines."""
    if not math.isfinite(top) or top <= 0:
        return 1.0, 0.2
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return step * math.ceil(top / step - 1e-9), step


def _label(v: float) -> str:
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


def _frame(title: str, ylabel: str, xlabel: str, top: float, step: float) -> list[str]:
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{_e(title)}</text>',
           f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {TOP + ph / 2})">{_e(ylabel)}</text>',
           f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 8}" text-anchor="middle">{_e(xlabel)}</text>']
    for i in range(round(top / step) + 1):
        v = i * step
        y = TOP + ph - ph * v / top
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#dddddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(_label(v))}</text>')
    out.append(f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#333333"/>')
    return out


def _legend(names: Sequence[str], colors: Sequence[str]) -> list[str]:
    out = []
    for i, (name, c) in enumerate(zip(names[:MAX_LEGEND], colors, strict=False)):
        y = TOP + 8 + 18 * i
        short = name if len(name) <= 22 else name[:21] + "…"
        out.append(f'<rect x="{WIDTH - RIGHT + 14}" y="{y - 9}" width="12" height="12" fill="{c}"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 32}" y="{y + 1}">{_e(short)}</text>')
    if len(names) > MAX_LEGEND:
        out.append(f'<text x="{WIDTH - RIGHT + 14}" y="{TOP + 8 + 18 * MAX_LEGEND}">+{len(names) - MAX_LEGEND} more</text>')
    return out


def _no_data(out: list[str]) -> str:
    out.append(f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#777777">no data</text>')
    return "\n".join([*out, "</svg>"])


def _color(i: int, colors: Sequence[str] | None) -> str:
    return colors[i % len(colors)] if colors else COLORS[i % len(COLORS)]


def bars(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float]], *, ylabel: str, xlabel: str,
         stacked: bool = False, colors: Sequence[str] | None = None) -> str:
    """Bars per category, one per series side by side (or stacked); each series has one value per category."""
    names = list(series)
    vals = [[max(0.0, float(v)) if math.isfinite(float(v)) else 0.0 for v in series[n]] for n in names]
    peak = max((sum(col) for col in zip(*vals, strict=True)) if stacked else (v for row in vals for v in row), default=0.0)
    top, step = _ticks(peak)
    out = _frame(title, ylabel, xlabel, top, step)
    if not categories or not names:
        return _no_data(out)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = pw / len(categories)
    width = slot * 0.8 / (1 if stacked else len(names))
    every = max(1, math.ceil(len(categories) / 20))  # at most about 20 category labels
    for j, cat in enumerate(categories):
        x0, base = LEFT + slot * j + slot * 0.1, 0.0
        for i in range(len(names)):
            v = vals[i][j]
            h = ph * v / top
            x = x0 if stacked else x0 + width * i
            y = TOP + ph - ph * base / top - h
            out.append(f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{max(width, 0.5):.1f}" height="{h:.1f}" '
                       f'fill="{_color(i, colors)}"/>')
            base = base + v if stacked else base
        if j % every == 0:
            out.append(f'<text x="{LEFT + slot * (j + 0.5):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_e(cat)}</text>')
    out += _legend(names, [_color(i, colors) for i in range(len(names))])
    return "\n".join([*out, "</svg>"])


def lines(title: str, x: Sequence[int], series: Mapping[str, Sequence[float | None]], *, ylabel: str, xlabel: str) -> str:
    """One line with markers per series over integer ``x`` (rounds); a None value is a gap."""
    names = list(series)
    finite = [float(v) for n in names for v in series[n] if v is not None and math.isfinite(float(v))]
    top, step = _ticks(max(finite, default=0.0))
    out = _frame(title, ylabel, xlabel, top, step)
    if not x or not finite:
        return _no_data(out)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lo, hi = min(x), max(x)

    def px(v: int) -> float:
        return LEFT + pw * (0.5 if hi == lo else 0.04 + 0.92 * (v - lo) / (hi - lo))

    every = max(1, math.ceil(len(x) / 20))
    for j, v in enumerate(x):
        if j % every == 0:
            out.append(f'<text x="{px(v):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_e(v)}</text>')
    for i, n in enumerate(names):
        c = _color(i, None)
        pts = [(px(xv), TOP + ph - ph * max(0.0, float(yv)) / top) for xv, yv in zip(x, series[n], strict=True)
               if yv is not None and math.isfinite(float(yv))]
        if len(pts) > 1:
            out.append(f'<polyline class="mark" fill="none" stroke="{c}" stroke-width="2" '
                       f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        out += [f'<circle class="mark" cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{c}"/>' for a, b in pts]
    out += _legend(names, [_color(i, None) for i in range(len(names))])
    return "\n".join([*out, "</svg>"])
