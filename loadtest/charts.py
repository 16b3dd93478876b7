"""The report page's charts, as inline SVG drawn here: no script, no library, no external URL.

`line_chart` draws series over seconds since the start with each fault as a
labelled band from its start to its end; `orders_chart` draws orders by
status, expected beside found. Axes take round ticks (`nice_ticks`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Protocol


class Band(Protocol):
    """A span to mark on a chart (a fault): what it was and when, in seconds since the start."""

    @property
    def kind(self) -> str: ...
    @property
    def at_s(self) -> float: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def detail(self) -> str: ...


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_W, _H = 880, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 30, 44
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
_LEGEND_CHAR_W = 7  # a generous width of one character of 12 px sans-serif: labels never overlap
_FAULT_COLOURS = {
    "consumer-kill": "#d62728",
    "broker-outage": "#8c564b",
    "db-connections": "#ff7f0e",
    "db-restart": "#9467bd",
}


def nice_ticks(high: float) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to the first at or above `high`."""
    high = high if high > 0 else 1.0
    raw = high / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def _x(value: float, x_max: float) -> float:
    return _LEFT + value / x_max * _PLOT_W


def _y(value: float, y_max: float) -> float:
    return _TOP + _PLOT_H - value / y_max * _PLOT_H


def _axes(x_ticks: Sequence[float], y_ticks: Sequence[float], x_title: str, y_title: str) -> str:
    """Frame, grid and labelled ticks; a category axis passes no x ticks."""
    y_max = y_ticks[-1]
    parts = ['<g class="axes" font-size="11" fill="#444">']
    for tick in y_ticks:
        y = _y(tick, y_max)
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + _PLOT_W}" y1="{y:.1f}" y2="{y:.1f}"'
            ' stroke="#e5e5e5"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(tick)}</text>'
        )
    for tick in x_ticks:
        x = _x(tick, x_ticks[-1])
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP + _PLOT_H}" y2="{_TOP + _PLOT_H + 4}"'
            f' stroke="#444"/><text x="{x:.1f}" y="{_TOP + _PLOT_H + 17}"'
            f' text-anchor="middle">{_tick_label(tick)}</text>'
        )
    parts.append(
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_PLOT_W}" height="{_PLOT_H}" fill="none"'
        f' stroke="#444"/><text x="{_LEFT + _PLOT_W / 2}" y="{_H - 6}" text-anchor="middle">'
        f'{_e(x_title)}</text><text transform="translate(14 {_TOP + _PLOT_H / 2}) rotate(-90)"'
        f' text-anchor="middle">{_e(y_title)}</text></g>'
    )
    return "".join(parts)


def _fault_marks(faults: Sequence[Band], x_max: float) -> str:
    """A band from each fault's start to the service's return, labelled with its kind."""
    parts = []
    for i, fault in enumerate(faults):
        colour = _FAULT_COLOURS.get(fault.kind, "#7f7f7f")
        x0 = _x(min(fault.at_s, x_max), x_max)
        x1 = _x(min(fault.at_s + fault.duration_s, x_max), x_max)
        tip = f"{fault.kind} at {fault.at_s:.1f} s for {fault.duration_s:.1f} s: {fault.detail}"
        parts.append(
            f'<g class="fault"><title>{_e(tip)}</title>'
            f'<rect x="{x0:.1f}" y="{_TOP}" width="{max(x1 - x0, 1.5):.1f}" height="{_PLOT_H}"'
            f' fill="{colour}" fill-opacity="0.15"/>'
            f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{_TOP}" y2="{_TOP + _PLOT_H}"'
            f' stroke="{colour}" stroke-dasharray="4 3"/>'
            f'<text x="{x0 + 3:.1f}" y="{_TOP + 12 + 13 * (i % 3)}" font-size="11"'
            f' fill="{colour}">{_e(fault.kind)}</text></g>'
        )
    return "".join(parts)


def _polyline(points: Sequence[tuple[float, float | None]], x_max: float, y_max: float) -> str:
    """Segments between missing values; a lone point is drawn as a dot."""
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            segments.append([])
        else:
            segments[-1].append((_x(x, x_max), _y(y, y_max)))
    parts = []
    for segment in segments:
        if len(segment) == 1:
            parts.append(f'<circle cx="{segment[0][0]:.1f}" cy="{segment[0][1]:.1f}" r="2.5"/>')
        elif segment:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
            parts.append(f'<polyline points="{coords}" fill="none" stroke-width="1.8"/>')
    return "".join(parts)


Series = tuple[str, str, list[tuple[float, float | None]]]  # label, colour, (t, value) points


def line_chart(
    chart_id: str, series: Sequence[Series], y_title: str, last_t: int, faults: Sequence[Band]
) -> str:
    """Lines over seconds since the start, each fault a labelled band."""
    fault_end = max((f.at_s + f.duration_s for f in faults), default=0.0)
    x_ticks = nice_ticks(max(last_t, fault_end, 1))
    values = [v for _, _, points in series for _, v in points if v is not None]
    y_ticks = nice_ticks(max(values, default=0))
    parts = [
        f'<svg id="{_e(chart_id)}" viewBox="0 0 {_W} {_H}"'
        f' width="{_W}" height="{_H}" font-family="sans-serif">',
        _axes(x_ticks, y_ticks, "seconds since the start", y_title),
        _fault_marks(faults, x_ticks[-1]),
    ]
    lx = _LEFT
    for label, colour, points in series:
        parts.append(f'<g class="series" stroke="{colour}" fill="{colour}">')
        parts.append(_polyline(points, x_ticks[-1], y_ticks[-1]))
        parts.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="12" y2="12" stroke-width="3"/>'
            f'<text x="{lx + 24}" y="16" font-size="12" stroke="none">{_e(label)}</text></g>'
        )
        lx += 24 + _LEGEND_CHAR_W * len(label) + 24  # the next entry after this one's text
    if not values:
        parts.append(
            f'<text x="{_LEFT + _PLOT_W / 2}" y="{_TOP + _PLOT_H / 2}" text-anchor="middle"'
            ' fill="#888">no data</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def orders_chart(rows: Sequence[tuple[str, int, int]]) -> str:
    """Bars per status, expected beside found; found in red where the two differ."""
    y_ticks = nice_ticks(1.1 * max((max(e, f) for _, e, f in rows), default=0))  # room for labels
    y_max = y_ticks[-1]
    parts = [
        f'<svg id="chart-orders" viewBox="0 0 {_W} {_H}"'
        f' width="{_W}" height="{_H}" font-family="sans-serif">',
        _axes([], y_ticks, "", "orders"),
        '<g font-size="12"><rect x="70" y="4" width="12" height="12" fill="#9aa7b8"/>'
        '<text x="88" y="15">expected</text>'
        '<rect x="170" y="4" width="12" height="12" fill="#2ca02c"/>'
        '<text x="188" y="15">found</text>'
        '<rect x="240" y="4" width="12" height="12" fill="#d62728"/>'
        '<text x="258" y="15">found, differs</text></g>',
    ]
    group_w = _PLOT_W / max(len(rows), 1)
    bar_w = min(group_w * 0.35, 60)
    base = _TOP + _PLOT_H
    for i, (status, expected, found) in enumerate(rows):
        centre = _LEFT + group_w * (i + 0.5)
        found_colour = "#2ca02c" if expected == found else "#d62728"
        for value, x, colour in (
            (expected, centre - bar_w, "#9aa7b8"),
            (found, centre, found_colour),
        ):
            top = _y(value, y_max)
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{top:.1f}" width="{bar_w:.1f}"'
                f' height="{base - top:.1f}" fill="{colour}"/><text x="{x + bar_w / 2:.1f}"'
                f' y="{top - 3:.1f}" font-size="11" text-anchor="middle">{value:,}</text>'
            )
        parts.append(
            f'<text x="{centre:.1f}" y="{base + 17}" font-size="12" text-anchor="middle">'
            f"{_e(status.replace('|', ' | '))}</text>"
        )
    if not rows:
        parts.append(
            f'<text x="{_LEFT + _PLOT_W / 2}" y="{_TOP + _PLOT_H / 2}" text-anchor="middle"'
            ' fill="#888">no orders</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
