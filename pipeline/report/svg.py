"""Static charts as inline SVG: line charts (ROC, precision-recall, nightly history) and
overlaid histograms.

Pure string building, no plotting library and no script: the page stays one self-contained
file that any browser (or a file share preview) renders. Every text that comes from data
(scorer, dataset and series names) is escaped here.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

#: Series colours (Tableau 10), in order; labels have fixed colours of their own.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
ALERT_COLOUR = "#d62728"
WIDTH, HEIGHT = 440, 300
_MARGIN = {"left": 58, "right": 14, "top": 30, "bottom": 46}


def colour(index: int) -> str:
    """The ``index``-th series colour, cycling through :data:`PALETTE`."""
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class Series:
    """One line: points ``(x[i], y[i])``; a NaN ``y`` breaks the line there."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    colour: str
    dashed: bool = False
    markers: bool = False


@dataclass(frozen=True)
class Bars:
    """One histogram group: the share of the group in each bin (``len(edges) - 1`` values)."""

    name: str
    heights: Sequence[float]
    colour: str


@dataclass(frozen=True)
class Frame:
    """The plot area of a chart and the data ranges it maps, data → pixels."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = WIDTH
    height: int = HEIGHT
    margin: dict = field(default_factory=lambda: dict(_MARGIN))

    @property
    def left(self) -> float:
        return self.margin["left"]

    @property
    def right(self) -> float:
        return self.width - self.margin["right"]

    @property
    def top(self) -> float:
        return self.margin["top"]

    @property
    def bottom(self) -> float:
        return self.height - self.margin["bottom"]

    def px(self, x: float) -> float:
        lo, hi = self.x_range
        return self.left + (x - lo) / (hi - lo) * (self.right - self.left)

    def py(self, y: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (y - lo) / (hi - lo) * (self.bottom - self.top)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float) -> str:
    """A pixel coordinate, two decimals at most."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 × 10^n) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def tick_label(value: float) -> str:
    """A tick value as short text: ``0.25``, ``1e-05``, ``120``."""
    if value == 0:
        return "0"
    return f"{value:.3g}"


def padded_range(values: Sequence[float], *, floor: float | None = None,
                 pad: float = 0.05) -> tuple[float, float]:
    """A data range around the finite ``values`` with ``pad`` of its span either side (a
    single value gets a span of its own); ``floor`` bounds the low end."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad * span, hi + pad * span
    if floor is not None:
        lo = max(lo, floor)
    return lo, hi


def _axes(frame: Frame, *, title: str, x_label: str, y_label: str,
          x_ticks: Sequence[tuple[float, str]] | None) -> list[str]:
    """Title, plot border, grid, ticks and axis labels."""
    out = [f'<rect x="{_num(frame.left)}" y="{_num(frame.top)}" '
           f'width="{_num(frame.right - frame.left)}" height="{_num(frame.bottom - frame.top)}" '
           'fill="#ffffff" stroke="#555555" stroke-width="1"/>',
           f'<text x="{_num(frame.width / 2)}" y="18" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{_esc(title)}</text>',
           f'<text x="{_num((frame.left + frame.right) / 2)}" y="{_num(frame.bottom + 31)}" '
           f'text-anchor="middle">{_esc(x_label)}</text>',
           f'<text x="14" y="{_num((frame.top + frame.bottom) / 2)}" text-anchor="middle" '
           f'transform="rotate(-90 14 {_num((frame.top + frame.bottom) / 2)})">'
           f'{_esc(y_label)}</text>']
    if x_ticks is None:
        x_ticks = [(t, tick_label(t)) for t in nice_ticks(*frame.x_range)
                   if frame.x_range[0] <= t <= frame.x_range[1]]
    for value, text in x_ticks:
        x = frame.px(value)
        out.append(f'<line x1="{_num(x)}" y1="{_num(frame.top)}" x2="{_num(x)}" '
                   f'y2="{_num(frame.bottom)}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_num(x)}" y="{_num(frame.bottom + 15)}" text-anchor="middle" '
                   f'font-size="10">{_esc(text)}</text>')
    for value in nice_ticks(*frame.y_range):
        if not frame.y_range[0] <= value <= frame.y_range[1]:
            continue
        y = frame.py(value)
        out.append(f'<line x1="{_num(frame.left)}" y1="{_num(y)}" x2="{_num(frame.right)}" '
                   f'y2="{_num(y)}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_num(frame.left - 5)}" y="{_num(y + 3.5)}" text-anchor="end" '
                   f'font-size="10">{_esc(tick_label(value))}</text>')
    return out


_LEGEND_ROW = 16
_CHAR_PX = 6.2  # average width of a 10 px sans-serif character, for laying out the legend


def _legend_rows(entries: Sequence[tuple[str, str, bool]], width: float
                 ) -> list[list[tuple[float, tuple[str, str, bool]]]]:
    """The legend's entries flowed into rows of at most ``width`` pixels: ``(x offset,
    entry)`` per row."""
    rows: list[list[tuple[float, tuple[str, str, bool]]]] = [[]]
    x = 0.0
    for entry in entries:
        size = 28 + _CHAR_PX * len(entry[0])
        if rows[-1] and x + size > width:
            rows.append([])
            x = 0.0
        rows[-1].append((x, entry))
        x += size + 10
    return [r for r in rows if r]


def legend_height(entries: Sequence[tuple[str, str, bool]], width: int = WIDTH) -> int:
    """The pixels a legend below a chart of ``width`` takes."""
    plot = width - _MARGIN["left"] - _MARGIN["right"]
    return _LEGEND_ROW * len(_legend_rows(entries, plot)) + 4 if entries else 0


def _legend(frame: Frame, entries: Sequence[tuple[str, str, bool]], swatch: bool = False
            ) -> list[str]:
    """The legend of ``(name, colour, dashed)`` entries below the x-axis label, never over
    the data: line samples, or filled squares (``swatch``)."""
    out = []
    top = frame.bottom + 38
    for r, row in enumerate(_legend_rows(entries, frame.right - frame.left)):
        cy = top + _LEGEND_ROW * r + _LEGEND_ROW / 2
        for dx, (name, line_colour, dashed) in row:
            x = frame.left + dx
            if swatch:
                out.append(f'<rect x="{_num(x + 4)}" y="{_num(cy - 5)}" width="10" height="10" '
                           f'fill="{line_colour}" fill-opacity="0.45" stroke="{line_colour}"/>')
            else:
                dash = ' stroke-dasharray="4 3"' if dashed else ""
                out.append(f'<line x1="{_num(x)}" y1="{_num(cy)}" x2="{_num(x + 20)}" '
                           f'y2="{_num(cy)}" stroke="{line_colour}" stroke-width="2.5"{dash}/>')
            out.append(f'<text x="{_num(x + 26)}" y="{_num(cy + 3.5)}" font-size="10">'
                       f'{_esc(name)}</text>')
    return out


def _svg(frame: Frame, parts: Sequence[str], description: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
            f'width="{frame.width}" height="{frame.height}" '
            f'viewBox="0 0 {frame.width} {frame.height}" font-family="sans-serif" '
            f'font-size="11" aria-label="{_esc(description)}"><title>{_esc(description)}'
            f'</title>{"".join(parts)}</svg>')


def _segments(frame: Frame, x: Sequence[float], y: Sequence[float]) -> list[list[tuple]]:
    """Runs of consecutive finite points, in pixels: a NaN breaks the line."""
    runs: list[list[tuple]] = [[]]
    for xi, yi in zip(x, y):
        if xi is None or yi is None or not (math.isfinite(xi) and math.isfinite(yi)):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((frame.px(xi), frame.py(yi)))
    return [r for r in runs if r]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               x_range: tuple[float, float], y_range: tuple[float, float],
               x_ticks: Sequence[tuple[float, str]] | None = None,
               alerts: Sequence[float] = (), diagonal: bool = False,
               width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG line chart of ``series`` over fixed ranges.

    ``x_ticks`` replaces the automatic ticks with ``(value, text)`` pairs (dates);
    ``alerts`` are x values marked by a red dashed vertical line (drift alerts); ``diagonal``
    draws the chance line of a ROC plot. The legend goes below the plot (the chart grows by
    its height).
    """
    entries = [(s.name, s.colour, s.dashed) for s in series]
    if alerts:
        entries.append(("drift alert", ALERT_COLOUR, True))
    extra = legend_height(entries, width)
    frame = Frame(x_range, y_range, width, height + extra,
                  {**_MARGIN, "bottom": _MARGIN["bottom"] + extra})
    parts = _axes(frame, title=title, x_label=x_label, y_label=y_label, x_ticks=x_ticks)
    if diagonal:
        parts.append(f'<line x1="{_num(frame.px(x_range[0]))}" y1="{_num(frame.py(y_range[0]))}" '
                     f'x2="{_num(frame.px(x_range[1]))}" y2="{_num(frame.py(y_range[1]))}" '
                     'stroke="#999999" stroke-dasharray="3 3"/>')
    for value in alerts:
        x = frame.px(value)
        parts.append(f'<line class="alert" x1="{_num(x)}" y1="{_num(frame.top)}" x2="{_num(x)}" '
                     f'y2="{_num(frame.bottom)}" stroke="{ALERT_COLOUR}" stroke-width="1.5" '
                     'stroke-dasharray="5 3"/>')
    for s in series:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        for run in _segments(frame, s.x, s.y):
            points = " ".join(f"{_num(px)},{_num(py)}" for px, py in run)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{s.colour}" '
                         f'stroke-width="2" stroke-linejoin="round"{dash}/>')
            if s.markers or len(run) == 1:
                parts.extend(f'<circle cx="{_num(px)}" cy="{_num(py)}" r="2.8" '
                             f'fill="{s.colour}"/>' for px, py in run)
    parts.extend(_legend(frame, entries))
    return _svg(frame, parts, title)


def histogram(groups: Sequence[Bars], edges: Sequence[float], *, title: str, x_label: str,
              y_label: str = "share of the group's queries", width: int = WIDTH,
              height: int = HEIGHT) -> str:
    """Overlaid, translucent histograms of ``groups`` on shared bin ``edges``."""
    edges = [float(e) for e in edges]
    top = max([float(h) for g in groups for h in g.heights] + [0.0])
    entries = [(g.name, g.colour, False) for g in groups]
    extra = legend_height(entries, width)
    frame = Frame((edges[0], edges[-1]), (0.0, top * 1.08 if top > 0 else 1.0), width,
                  height + extra, {**_MARGIN, "bottom": _MARGIN["bottom"] + extra})
    parts = _axes(frame, title=title, x_label=x_label, y_label=y_label, x_ticks=None)
    for group in groups:
        for lo, hi, h in zip(edges[:-1], edges[1:], group.heights):
            if h <= 0:
                continue
            x0, x1, y = frame.px(lo), frame.px(hi), frame.py(float(h))
            parts.append(f'<rect class="bar" x="{_num(x0)}" y="{_num(y)}" '
                         f'width="{_num(max(x1 - x0, 0.5))}" '
                         f'height="{_num(frame.bottom - y)}" fill="{group.colour}" '
                         f'fill-opacity="0.45" stroke="{group.colour}" stroke-width="1"/>')
    parts.extend(_legend(frame, entries, swatch=True))
    return _svg(frame, parts, title)
