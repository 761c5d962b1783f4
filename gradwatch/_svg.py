"""Inline SVG charts for the HTML report: pure functions from numbers to markup, drawn without any library.

The markup is meant to sit inside an HTML page (no `xmlns`, no external fonts). Every piece of text goes
through `html.escape`. NaN is a gap, Inf is drawn apart from the scale, and long series are reduced to a
min/max envelope, so a chart stays a few tens of kB however long the run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

WIDTH = 860
PLOT_H = 240
TOP, RIGHT, BOTTOM, LEFT = 30, 20, 36, 64  # margins around a line chart's plot area
LABEL_W = 170  # heatmap row labels
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                  "#17becf", "#393b79")
MARK_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#17becf")
INF_COLOUR = "#ff2d55"
# viridis, sampled at five stops; the heatmap interpolates LEVELS colours between them
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
LEVELS = 32


def _ramp(n: int) -> tuple[str, ...]:
    out = []
    for i in range(n):
        t = i / (n - 1) * (len(_VIRIDIS) - 1)
        k = min(int(t), len(_VIRIDIS) - 2)
        a, b = _VIRIDIS[k], _VIRIDIS[k + 1]
        out.append("#" + "".join(f"{round(x + (y - x) * (t - k)):02x}" for x, y in zip(a, b)))
    return tuple(out)


RAMP = _ramp(LEVELS)


def fmt(v: float) -> str:
    """A short label for a number: integers as such, the rest with 3 significant digits."""
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    t = escape(title)
    return (f'<svg viewBox="0 0 {_n(width)} {_n(height)}" width="{_n(width)}" height="{_n(height)}" role="img" '
            f'aria-label="{t}"><text class="title" x="{LEFT}" y="18">{t}</text>{"".join(body)}</svg>')


def empty(title: str, message: str = "no data") -> str:
    """A placeholder chart with `message` where the plot would be."""
    return _svg(WIDTH, 90, title, [f'<text class="note" x="{WIDTH / 2}" y="58" text-anchor="middle">'
                                   f'{escape(message)}</text>'])


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values in [lo, hi], about `n` intervals apart: 1, 2 or 5 times a power of ten."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    base = 10 ** math.floor(math.log10(raw))
    step = min((base * m for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first = math.ceil(lo / step - 1e-9)
    return [float(f"{k * step:.12g}") for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _span(v: np.ndarray) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:  # a constant series: centre it
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def envelope(xs: np.ndarray, ys: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points: the min and the max of each of max_points/2 equal runs, in x order.

    Spikes survive (a bucket keeps its extreme), and a bucket with no finite value keeps one NaN, so a gap
    in the data stays a gap in the line.
    """
    if len(xs) <= max_points:
        return xs, ys
    buckets = max(max_points // 2, 1)
    per = math.ceil(len(xs) / buckets)
    pad = buckets * per - len(xs)
    y = np.concatenate([ys, np.full(pad, np.nan)]).reshape(buckets, per)
    x = np.concatenate([xs, np.full(pad, xs[-1])]).reshape(buckets, per)
    nan = np.isnan(y)
    lo = np.where(nan, np.inf, y).argmin(axis=1)
    hi = np.where(nan, -np.inf, y).argmax(axis=1)
    cols = np.sort(np.stack([lo, hi], axis=1), axis=1)
    rows = np.arange(buckets)[:, None]
    out_x, out_y = x[rows, cols], y[rows, cols]
    out_y[nan.all(axis=1)] = np.nan
    return out_x.ravel(), out_y.ravel()


def _path(px: np.ndarray, py: np.ndarray, colour: str, name: str) -> str:
    """Polyline segments split at NaN; a lone point becomes a dot."""
    out: list[str] = []
    seg: list[tuple[str, str]] = []
    for x, y in zip(np.append(px, np.nan), np.append(py, np.nan)):
        if not np.isnan(y):
            seg.append((_n(x), _n(y)))
            continue
        if len(seg) == 1:
            out.append(f'<circle cx="{seg[0][0]}" cy="{seg[0][1]}" r="2.5" fill="{colour}"/>')
        elif seg:
            d = "L".join(f"{a} {b}" for a, b in seg)
            out.append(f'<path d="M{d}" fill="none" stroke="{colour}" stroke-width="1.4"/>')
        seg = []
    return f'<g><title>{escape(name)}</title>{"".join(out)}</g>' if out else ""


def _legend(items: list[tuple[str, str]], y0: float) -> tuple[list[str], float]:
    """Swatch + name entries, four per row, under the plot; returns the markup and the height used."""
    out, per_row, col_w = [], 4, (WIDTH - LEFT) / 4
    for i, (name, colour) in enumerate(items):
        x, y = LEFT + (i % per_row) * col_w, y0 + (i // per_row) * 16
        short = name if len(name) <= 28 else name[:27] + "\u2026"
        out.append(f'<rect x="{_n(x)}" y="{_n(y - 9)}" width="10" height="10" fill="{colour}"/>'
                   f'<text class="legend" x="{_n(x + 14)}" y="{_n(y)}"><title>{escape(name)}</title>'
                   f'{escape(short)}</text>')
    return out, math.ceil(len(items) / per_row) * 16


def _axes(x_ticks, y_ticks, to_px, to_py, y_label: str, log_y: bool) -> list[str]:
    out = [f'<line x1="{LEFT}" y1="{TOP + PLOT_H}" x2="{WIDTH - RIGHT}" y2="{TOP + PLOT_H}" stroke="#888"/>']
    for t in y_ticks:
        y = _n(to_py(t))
        out.append(f'<line x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}" stroke="#e5e5e5"/><text class="tick" '
                   f'x="{LEFT - 6}" y="{y}" dy="4" text-anchor="end">{fmt(10 ** t if log_y else t)}</text>')
    for t in x_ticks:
        x = _n(to_px(t))
        out.append(f'<text class="tick" x="{x}" y="{TOP + PLOT_H + 16}" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<text class="tick" x="{WIDTH - RIGHT}" y="{TOP + PLOT_H + 30}" text-anchor="end">step</text>')
    if y_label:
        out.append(f'<text class="tick" x="14" y="{TOP + PLOT_H / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {TOP + PLOT_H / 2})">{escape(y_label)}</text>')
    return out


def _marks(marks: Sequence[tuple[float, str, str]], to_px, x_lo: float, x_hi: float) -> tuple[list[str], list]:
    """Vertical lines at (x, category, tooltip), one per pixel and category; returns markup and legend."""
    cats = list(dict.fromkeys(c for _, c, _ in marks))
    colour = {c: MARK_COLOURS[i % len(MARK_COLOURS)] for i, c in enumerate(cats)}
    at: dict[tuple[int, str], list[str]] = {}
    for x, cat, tip in marks:
        if x_lo <= x <= x_hi:
            at.setdefault((round(to_px(x)), cat), []).append(tip)
    out = []
    for (px, cat), tips in at.items():
        more = f" (+{len(tips) - 1} more)" if len(tips) > 1 else ""
        out.append(f'<line x1="{px}" y1="{TOP}" x2="{px}" y2="{TOP + PLOT_H}" stroke="{colour[cat]}" '
                   f'stroke-width="1.5" stroke-dasharray="4 3"><title>{escape(tips[0] + more)}</title></line>')
    drawn = dict.fromkeys(cat for _, cat in at)
    return out, [(c, colour[c]) for c in drawn]


def _clean(ys: Sequence[float], log_y: bool) -> np.ndarray:
    """Values to plot: non-finite (and, on a log axis, non-positive) values become NaN gaps; log10 if log_y."""
    y = np.asarray(ys, dtype=float)
    ok = np.isfinite(y) & (y > 0) if log_y else np.isfinite(y)
    y = np.where(ok, y, np.nan)
    return np.log10(y, where=ok, out=np.full_like(y, np.nan)) if log_y else y


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str, y_label: str = "",
               log_y: bool = False, x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None, marks: Sequence[tuple[float, str, str]] = (),
               max_points: int = 1600) -> str:
    """Lines over steps, with optional vertical marks.

    Args:
        series: (name, steps, values) triples, steps ascending. NaN, Inf (and values <= 0 on a log scale)
            are gaps. A legend under the plot names them.
        title: drawn above the plot and used as the chart's accessible name.
        y_label: the y axis's name.
        log_y: a log10 y axis.
        x_range: fixed step limits (to line up with other charts of the run) instead of the data's span.
        y_range: fixed y limits (linear axis only) instead of the data's span.
        marks: (step, category, tooltip) triples drawn as dashed vertical lines, one colour per category.
        max_points: the most points drawn over all series; longer series keep a min/max envelope.
    """
    per_series = max(max_points // max(len(series), 1), 100)
    raw = [(name, np.asarray(xs, dtype=float), _clean(ys, log_y)) for name, xs, ys in series]
    ys_all = np.concatenate([y for _, _, y in raw]) if raw else np.array([])
    if not np.isfinite(ys_all).any():
        return empty(title)
    x_lo, x_hi = _span(np.concatenate([x for _, x, _ in raw]) if x_range is None else np.asarray(x_range))
    y_lo, y_hi = _span(ys_all[np.isfinite(ys_all)] if y_range is None or log_y else np.asarray(y_range))
    lines = [(name, *envelope(x, y, per_series)) for name, x, y in raw]
    to_px = lambda v: LEFT + (v - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)
    to_py = lambda v: TOP + PLOT_H - (v - y_lo) / (y_hi - y_lo) * PLOT_H
    y_ticks = ticks(y_lo, y_hi)
    if log_y and y_hi - y_lo >= 1:
        y_ticks = [t for t in ticks(y_lo, y_hi) if t == int(t)]  # whole decades
    body = _axes(ticks(x_lo, x_hi), y_ticks, to_px, to_py, y_label, log_y)
    colours = [SERIES_COLOURS[i % len(SERIES_COLOURS)] for i in range(len(lines))]
    body += [_path(to_px(x), to_py(np.clip(y, y_lo, y_hi)), c, name) for (name, x, y), c in zip(lines, colours)]
    mark_svg, mark_legend = _marks(marks, to_px, x_lo, x_hi)
    named = [(name, c) for (name, _, _), c in zip(lines, colours)]
    legend, legend_h = _legend(named + mark_legend, TOP + PLOT_H + 50)
    return _svg(WIDTH, TOP + PLOT_H + BOTTOM + legend_h + 8, title, body + mark_svg + legend)


def _level(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Colour index per value on a log scale: 0..LEVELS-1, -1 for NaN (not drawn), LEVELS for Inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log10(np.where(v > 0, v, np.nan)) - lo) / (hi - lo)
    level = np.clip(np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0) * (LEVELS - 1) + 0.5, 0, LEVELS - 1).astype(int)
    level[~np.isfinite(v)] = LEVELS
    level[np.isnan(v)] = -1
    return level


def _row(levels: np.ndarray, y: int) -> str:
    """One heatmap row, neighbouring cells of the same colour merged into one rect."""
    out, start = [], 0
    for j in range(1, len(levels) + 1):
        if j == len(levels) or levels[j] != levels[start]:
            if levels[start] >= 0:
                fill = INF_COLOUR if levels[start] == LEVELS else RAMP[levels[start]]
                out.append(f'<rect x="{start}" y="{y}" width="{j - start}" height="1" fill="{fill}"/>')
            start = j
    return "".join(out)


def _colour_bar(x0: float, y: float, lo: float, hi: float, has_inf: bool) -> list[str]:
    """The log colour scale: its bottom and top values, and the Inf swatch when some cell is Inf."""
    w = 8
    out = [f'<text class="tick" x="{x0}" y="{_n(y + 9)}" text-anchor="end">{fmt(10 ** lo)}</text>']
    out += [f'<rect x="{x0 + 6 + i * w}" y="{_n(y)}" width="{w}" height="10" fill="{c}"/>' for i, c in enumerate(RAMP)]
    x = x0 + 12 + LEVELS * w
    out.append(f'<text class="tick" x="{x}" y="{_n(y + 9)}">{fmt(10 ** hi)}</text>')
    if has_inf:
        out.append(f'<rect x="{x + 60}" y="{_n(y)}" width="10" height="10" fill="{INF_COLOUR}"/>'
                   f'<text class="tick" x="{x + 74}" y="{_n(y + 9)}">Inf</text>')
    return out


def _heatmap_axes(row_labels: Sequence[str], row_h: float, x_range: tuple[float, float], left: float,
                  plot_w: float) -> list[str]:
    """Row names (the end of a long one; the full name on hover) and step ticks under the plot."""
    out = []
    for i in range(0, len(row_labels), math.ceil(9 / row_h)):  # every row only when rows are tall enough
        name = row_labels[i]
        short = name if len(name) <= 30 else "\u2026" + name[-29:]
        out.append(f'<text class="tick" x="{left - 6}" y="{_n(TOP + (i + 0.5) * row_h + 3.5)}" '
                   f'text-anchor="end"><title>{escape(name)}</title>{escape(short)}</text>')
    bottom = TOP + len(row_labels) * row_h
    x_lo, x_hi = x_range
    for t in ticks(x_lo, x_hi):
        x = left + (t - x_lo) / ((x_hi - x_lo) or 1) * plot_w
        out.append(f'<text class="tick" x="{_n(x)}" y="{_n(bottom + 16)}" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<text class="tick" x="{WIDTH - RIGHT}" y="{_n(bottom + 30)}" text-anchor="end">step</text>')
    return out


def heatmap(values: np.ndarray, row_labels: Sequence[str], x_range: tuple[float, float], *, title: str) -> str:
    """Rows (top to bottom) by equal-width step bins, coloured on a log scale.

    Args:
        values: a rows x bins array. NaN cells (not measured) stay blank; Inf cells get their own colour;
            values <= 0 take the bottom colour.
        row_labels: one name per row.
        x_range: the first step of the first bin and the end of the last one.
        title: drawn above the plot and used as the chart's accessible name.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.isnan(v).all():
        return empty(title)
    rows, bins = v.shape
    pos = v[np.isfinite(v) & (v > 0)]
    lo, hi = (math.log10(pos.min()), math.log10(pos.max())) if pos.size else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    row_h = min(max(600 / rows, 2.0), 14.0)
    left, plot_w, plot_h = LEFT + LABEL_W, WIDTH - LEFT - LABEL_W - RIGHT, rows * row_h
    levels = _level(v, lo, hi)
    cells = "".join(_row(levels[i], i) for i in range(rows))
    body = [f'<rect x="{left}" y="{TOP}" width="{plot_w}" height="{_n(plot_h)}" fill="#f2f2f2"/>',
            f'<svg x="{left}" y="{TOP}" width="{plot_w}" height="{_n(plot_h)}" viewBox="0 0 {bins} {rows}" '
            f'preserveAspectRatio="none" shape-rendering="crispEdges">{cells}</svg>']
    body += _heatmap_axes(row_labels, row_h, x_range, left, plot_w)
    body += _colour_bar(left + 40, TOP + plot_h + 22, lo, hi, bool((levels == LEVELS).any()))
    return _svg(WIDTH, TOP + plot_h + 44, title, body)
