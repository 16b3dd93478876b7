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
statuses are summed before they are compared, and each part is shown on an
indented row under the merged one ("of which placed").

Rates name what they count: deliveries acknowledged (copies included) are
deliveries/s, events applied (distinct) are events/s.
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
from typing import Any, NamedTuple

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from intentflow.loadtest import charts


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

# The two rates, in the table and the chart's legend alike: each says what it counts.
APPLIED = "applied, events/s"
ACKNOWLEDGED = "acknowledged, deliveries/s"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def _mark(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("FAILED", style="bold red")


class Row(NamedTuple):
    label: str
    expected: str
    found: str
    held: bool | None  # None: nothing to hold
    part: bool = False  # a part of the row above it: indented under it


def _order_rows(report: Report) -> list[Row]:
    """A row per status; under a merged one, how the stock decided between its parts."""
    rows = []
    for status, expected, found in order_rows(report):
        rows.append(Row(f"orders {status}", _n(expected), _n(found), expected == found))
        if "|" in status:
            rows += [
                Row(f"of which {part}", "", _n(report.orders_found.get(part, 0)), None, True)
                for part in status.split("|")
            ]
    return rows


def summary(report: Report) -> list[list[Row]]:
    """The headline numbers in sections: traffic, the database vs the histories, speed."""
    latency = report.latency_ms
    survived = sum(fault.survived for fault in report.faults)
    traffic = [
        Row("events sent, distinct", "", _n(report.events_distinct), None),
        Row("deliveries acknowledged", "", _n(report.deliveries), None),
        Row("attempts (retried)", "", f"{_n(report.attempts)} ({_n(report.retried)})", None),
        Row("duplicates absorbed", "", _n(report.duplicates_absorbed), None),
        Row("faults injected (survived)", "", f"{len(report.faults)} ({survived})", None),
    ]
    database = _order_rows(report)
    database.append(
        Row(
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
        database.append(Row(label, "0", _n(value), value == 0))
    speed = [
        Row("elapsed", "", f"{report.elapsed_s:,.1f} s", None),
        Row(f"throughput {APPLIED}", "", _n(report.events_per_s), None),
        Row(f"throughput {ACKNOWLEDGED}", "", _n(report.deliveries_per_s), None),
    ]
    speed += [Row(f"latency {key}", "", _ms(latency.get(key)), None) for key in _PERCENTILES]
    source = f"latency from received-at to {report.latency_source}, over"
    speed.append(Row(source, "", f"{_n(latency.get('count', 0))} events", None))
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
        for row in section:
            label = f"  {row.label}" if row.part else row.label
            mark = "" if row.held is None else _mark(row.held)
            table.add_row(label, row.expected, row.found, mark)
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


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: object) -> str:
    bad = value in ("FAILED", "NOT BACK")
    return f'<td class="bad">{_e(value)}</td>' if bad else f"<td>{_e(value)}</td>"


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], parts: Sequence[bool] = ()
) -> str:
    """`parts[i]`: row i is a part of the row above it, indented under it."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        ('<tr class="part">' if i < len(parts) and parts[i] else "<tr>")
        + "".join(_cell(cell) for cell in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def setting(value: object) -> str:
    """A configuration value as a reader writes it: `max`, not `"max"`; a list comma-separated."""
    plain = _plain(value)
    if plain is None:
        return "—"
    if isinstance(plain, bool):
        return "yes" if plain else "no"
    if isinstance(plain, list):
        return ", ".join(setting(item) for item in plain) or "—"
    if isinstance(plain, dict):
        return ", ".join(f"{key} {setting(item)}" for key, item in plain.items()) or "—"
    return str(plain)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 920px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
.verdict { font-size: 1.3em; font-weight: bold; padding: .4em .7em; border-radius: 4px; }
.ok { background: #e3f4e3; color: #1a661a; } .failed { background: #fbe3e3; color: #a01818; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
td, th { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td.bad { color: #a01818; font-weight: bold; }
tr.part td:first-child { padding-left: 2.3em; color: #555; }
svg { max-width: 100%; height: auto; }
"""


def _page(report: Report) -> str:
    timeline = report.timeline
    last_t = max((second.t for second in timeline), default=0)
    throughput = charts.line_chart(
        "chart-throughput",
        [
            (ACKNOWLEDGED, "#1f77b4", [(s.t, float(s.acked)) for s in timeline]),
            (APPLIED, "#2ca02c", [(s.t, float(s.applied)) for s in timeline]),
        ],
        "deliveries/s, events/s",
        last_t,
        report.faults,
    )
    latency_chart = charts.line_chart(
        "chart-latency",
        [
            ("p50 ms", "#1f77b4", [(s.t, s.latency_p50_ms) for s in timeline]),
            ("p99 ms", "#d62728", [(s.t, s.latency_p99_ms) for s in timeline]),
        ],
        "ms, receipt to commit",
        last_t,
        report.faults,
    )
    headline = [row for section in summary(report) for row in section]
    headline_cells = [
        (
            row.label,
            row.expected,
            row.found,
            "" if row.held is None else "ok" if row.held else "FAILED",
        )
        for row in headline
    ]
    config = [(key, setting(value)) for key, value in report.config.items()]
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
            _html_table(
                ("", "expected", "found", ""),
                headline_cells,
                [row.part for row in headline],
            ),
            "<h2>configuration and services</h2>",
            _html_table(("", ""), config),
            "<h2>throughput</h2>",
            throughput,
            "<h2>latency</h2>",
            latency_chart,
            "<h2>orders by status</h2>",
            charts.orders_chart(order_rows(report)),
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
