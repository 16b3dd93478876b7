"""The report of a `replay-duplicates` run: what was sent, what the database holds, and the verdict.

The harness fills a `Report`; this module only renders it, three ways:

1. `to_json` / `write_json`: plain JSON with the field names below (the README
   documents `oversold_units`, `events_per_s`, `latency_ms.p99`, …).
2. `print_summary`: the final tables in the terminal (rich); plain text when
   piped into a file.
3. `write_html`: one self-contained page — no script, no external URL — whose
   charts are SVG drawn here: throughput and latency per second with the
   faults marked as bands, and orders by status, expected vs found.

Expected order counts may merge statuses the histories cannot tell apart
("placed|out_of_stock": the stock decides); the found counts of those
statuses are summed before they are compared.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass
class Fault:
    kind: str  # "consumer_kill" | "db_connections" | "db_restart" | "broker_outage"
    at_s: float  # when it began, seconds since the run's start
    duration_s: float  # until the service was back (restart / restore)
    detail: str  # one line, e.g. "consumer 2 (pid 1234) killed -9, restarted after 2.0 s"
    survived: bool  # the service came back


@dataclass
class Check:
    name: str  # e.g. "oversold units", "lost events", "reconcile"
    expected: str
    found: str
    ok: bool


@dataclass
class Second:
    """One bucket of the timeline."""

    t: int  # second since the run's start
    acked: int  # deliveries acknowledged (HTTP 2xx / Kafka ack) in that second
    applied: int  # distinct events committed by the consumers in that second
    latency_p99_ms: float | None  # receipt -> commit, of the events committed that second
    latency_p50_ms: float | None


@dataclass
class Report:
    started_at: str  # ISO 8601 UTC
    config: dict[
        str, Any
    ]  # intents, duplicates, reorder, rate, senders, via, consumers, chaos, seed
    services: dict[str, str]  # e.g. {"kafka": "embedded tansu at 127.0.0.1:1234"}
    events_distinct: int  # distinct Stripe events generated
    deliveries: int  # deliveries acknowledged (duplicates included)
    attempts: int  # HTTP requests or Kafka sends made, retries included
    retried: int  # attempts answered 503 / failed and retried
    duplicates_absorbed: int  # deliveries - distinct events applied
    lost_events: int  # acknowledged events not found applied in the database
    duplicate_orders: int
    oversold_units: int
    orders_expected: dict[str, int]  # by status; "placed|out_of_stock" may be one merged key
    orders_found: dict[str, int]  # by status
    stock_expected: int  # units left in stock, summed over SKUs, as the histories imply
    stock_found: int
    elapsed_s: float  # first send to last commit
    events_per_s: float  # distinct events applied per second over elapsed_s
    deliveries_per_s: float
    latency_ms: dict[str, float]  # p50, p95, p99, max, count — received-at header -> commit
    latency_source: str  # "commit timestamp" or "transaction start"
    timeline: list[Second]
    faults: list[Fault]
    checks: list[Check]
    ok: bool  # every check held


def verdict(report: Report) -> str:
    """ "every check held", or "CHECKS FAILED: " and the names of those that did not."""
    failed = [check.name for check in report.checks if not check.ok]
    if report.ok and not failed:
        return "every check held"
    return "CHECKS FAILED: " + (", ".join(failed) or "the run is marked failed")


def order_rows(report: Report) -> list[tuple[str, int, int]]:
    """(status, expected, found) per status; found counts summed over a merged expected key."""
    rows = []
    covered: set[str] = set()
    for key, expected in report.orders_expected.items():
        parts = key.split("|")
        covered.update(parts)
        rows.append((key, expected, sum(report.orders_found.get(part, 0) for part in parts)))
    for status, found in report.orders_found.items():
        if status not in covered:
            rows.append((status, 0, found))
    return rows


# --- JSON -------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    return str(value)  # a Path or an enum in the config


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain JSON types, nested as the dataclasses are."""
    plain: dict[str, Any] = _plain(dataclasses.asdict(report))
    return plain


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")


# --- terminal ---------------------------------------------------------------------------------


_PERCENTILES = ("p50", "p95", "p99", "max")


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def _mark(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("FAILED", style="bold red")


Row = tuple[str, str, str, bool | None]  # label, expected, found, held (None: nothing to hold)


def summary(report: Report) -> list[list[Row]]:
    """The headline numbers in sections: traffic, the database vs the histories, speed."""
    latency = report.latency_ms
    survived = sum(fault.survived for fault in report.faults)
    traffic: list[Row] = [
        ("events sent, distinct", "", _n(report.events_distinct), None),
        ("deliveries acknowledged", "", _n(report.deliveries), None),
        ("attempts (retried)", "", f"{_n(report.attempts)} ({_n(report.retried)})", None),
        ("duplicates absorbed", "", _n(report.duplicates_absorbed), None),
        ("faults injected (survived)", "", f"{len(report.faults)} ({survived})", None),
    ]
    database: list[Row] = [
        (f"orders {status}", _n(expected), _n(found), expected == found)
        for status, expected, found in order_rows(report)
    ]
    database.append(
        (
            "stock left, units",
            _n(report.stock_expected),
            _n(report.stock_found),
            report.stock_expected == report.stock_found,
        )
    )
    for label, value in (
        ("oversold units", report.oversold_units),
        ("lost events", report.lost_events),
        ("duplicate orders", report.duplicate_orders),
    ):
        database.append((label, "0", _n(value), value == 0))
    speed: list[Row] = [
        ("elapsed", "", f"{report.elapsed_s:,.1f} s", None),
        ("throughput, events/s", "", _n(report.events_per_s), None),
        ("throughput, deliveries/s", "", _n(report.deliveries_per_s), None),
    ]
    speed += [(f"latency {key}", "", _ms(latency.get(key)), None) for key in _PERCENTILES]
    source = f"latency from received-at to {report.latency_source}, over"
    speed.append((source, "", f"{_n(latency.get('count', 0))} events", None))
    return [traffic, database, speed]


def _main_table(report: Report) -> Table:
    title = f"replay-duplicates, {report.started_at}"
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("")
    table.add_column("expected", justify="right")
    table.add_column("found", justify="right")
    table.add_column("")
    for i, section in enumerate(summary(report)):
        if i:
            table.add_section()
        for label, expected, found, held in section:
            table.add_row(label, expected, found, "" if held is None else _mark(held))
    return table


def _faults_table(report: Report) -> Table:
    table = Table(title="faults", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("at", "right"), ("kind", "left"), ("lasted", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("detail", overflow="fold")
    table.add_column("")
    for fault in report.faults:
        survived = Text("survived", style="green") if fault.survived else Text("NOT BACK", "red")
        table.add_row(
            f"{fault.at_s:,.1f} s", fault.kind, f"{fault.duration_s:,.1f} s", fault.detail, survived
        )
    return table


def _checks_table(report: Report) -> Table:
    table = Table(title="checks", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("check")
    table.add_column("expected", justify="right")
    table.add_column("found", justify="right")
    table.add_column("")
    for check in report.checks:
        table.add_row(check.name, check.expected, check.found, _mark(check.ok))
    return table


def print_summary(report: Report, console: Console | None = None) -> None:
    """The final tables; plain text (no colour codes) when stdout is not a terminal."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 120)
    console.print(_main_table(report))
    if report.faults:
        console.print(_faults_table(report))
    console.print(_checks_table(report))
    line = verdict(report)
    console.print(Text(line, style="bold green" if report.ok else "bold red"))


# --- HTML -------------------------------------------------------------------------------------

_W, _H = 880, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 30, 44
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
_FAULT_COLOURS = {
    "consumer_kill": "#d62728",
    "db_connections": "#ff7f0e",
    "db_restart": "#9467bd",
    "broker_outage": "#8c564b",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


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


def _fault_marks(faults: Sequence[Fault], x_max: float) -> str:
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


def _line_chart(chart_id: str, series: Sequence[Series], y_title: str, report: Report) -> str:
    last_t = max((second.t for second in report.timeline), default=0)
    fault_end = max((f.at_s + f.duration_s for f in report.faults), default=0.0)
    x_ticks = nice_ticks(max(last_t, fault_end, 1))
    values = [v for _, _, points in series for _, v in points if v is not None]
    y_ticks = nice_ticks(max(values, default=0))
    parts = [
        f'<svg id="{_e(chart_id)}" viewBox="0 0 {_W} {_H}"'
        f' width="{_W}" height="{_H}" font-family="sans-serif">',
        _axes(x_ticks, y_ticks, "seconds since the start", y_title),
        _fault_marks(report.faults, x_ticks[-1]),
    ]
    for i, (label, colour, points) in enumerate(series):
        parts.append(f'<g class="series" stroke="{colour}" fill="{colour}">')
        parts.append(_polyline(points, x_ticks[-1], y_ticks[-1]))
        lx = _LEFT + i * 150
        parts.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="12" y2="12" stroke-width="3"/>'
            f'<text x="{lx + 24}" y="16" font-size="12" stroke="none">{_e(label)}</text></g>'
        )
    if not values:
        parts.append(
            f'<text x="{_LEFT + _PLOT_W / 2}" y="{_TOP + _PLOT_H / 2}" text-anchor="middle"'
            ' fill="#888">no data</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _orders_chart(report: Report) -> str:
    rows = order_rows(report)
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


def _cell(value: object) -> str:
    bad = value in ("FAILED", "NOT BACK")
    return f'<td class="bad">{_e(value)}</td>' if bad else f"<td>{_e(value)}</td>"


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 920px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
.verdict { font-size: 1.3em; font-weight: bold; padding: .4em .7em; border-radius: 4px; }
.ok { background: #e3f4e3; color: #1a661a; } .failed { background: #fbe3e3; color: #a01818; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
td, th { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td.bad { color: #a01818; font-weight: bold; }
svg { max-width: 100%; height: auto; }
"""


def _page(report: Report) -> str:
    timeline = report.timeline
    throughput = _line_chart(
        "chart-throughput",
        [
            ("acknowledged/s", "#1f77b4", [(s.t, float(s.acked)) for s in timeline]),
            ("applied/s", "#2ca02c", [(s.t, float(s.applied)) for s in timeline]),
        ],
        "per second",
        report,
    )
    latency_chart = _line_chart(
        "chart-latency",
        [
            ("p50 ms", "#1f77b4", [(s.t, s.latency_p50_ms) for s in timeline]),
            ("p99 ms", "#d62728", [(s.t, s.latency_p99_ms) for s in timeline]),
        ],
        "ms, receipt to commit",
        report,
    )
    headline = [
        (label, expected, found, "" if held is None else "ok" if held else "FAILED")
        for section in summary(report)
        for label, expected, found, held in section
    ]
    config = [(key, json.dumps(_plain(value))) for key, value in report.config.items()]
    config += [(name, address) for name, address in report.services.items()]
    faults = [
        (
            f"{f.at_s:,.1f} s",
            f.kind,
            f"{f.duration_s:,.1f} s",
            f.detail,
            "survived" if f.survived else "NOT BACK",
        )
        for f in report.faults
    ]
    checks = [(c.name, c.expected, c.found, "ok" if c.ok else "FAILED") for c in report.checks]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>replay-duplicates {_e(report.started_at)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>replay-duplicates, {_e(report.started_at)}</h1>",
            f'<p class="verdict {"ok" if report.ok else "failed"}">{_e(verdict(report))}</p>',
            _html_table(("", "expected", "found", ""), headline),
            "<h2>configuration and services</h2>",
            _html_table(("", ""), config),
            "<h2>throughput</h2>",
            throughput,
            "<h2>latency</h2>",
            latency_chart,
            "<h2>orders by status</h2>",
            _orders_chart(report),
            "<h2>checks</h2>",
            _html_table(("check", "expected", "found", ""), checks),
            "<h2>faults</h2>",
            _html_table(("at", "kind", "lasted", "detail", ""), faults)
            if faults
            else "<p>none injected</p>",
            "</body></html>",
            "",
        ]
    )


def write_html(report: Report, path: str | os.PathLike[str]) -> None:
    """One self-contained page: inline CSS and SVG, no script, nothing fetched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_page(report), encoding="utf-8")
