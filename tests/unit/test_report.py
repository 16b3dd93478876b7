"""The load-test report: its JSON paths, the terminal tables, one self-contained HTML page."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console

from intentflow.loadtest.charts import nice_ticks
from intentflow.loadtest.progress import Progress
from intentflow.loadtest.report import (
    Check,
    Fault,
    Report,
    Second,
    order_rows,
    print_summary,
    to_json,
    write_html,
    write_json,
)


def sample(**changes: object) -> Report:
    """Six seconds of a run with a consumer killed and the database's connections cut."""
    timeline = [
        Second(t=0, acked=120, applied=90, latency_p99_ms=80.0, latency_p50_ms=30.0),
        Second(t=1, acked=400, applied=380, latency_p99_ms=95.5, latency_p50_ms=41.0),
        Second(t=2, acked=410, applied=0, latency_p99_ms=None, latency_p50_ms=None),
        Second(t=3, acked=380, applied=700, latency_p99_ms=2400.0, latency_p50_ms=900.0),
        Second(t=4, acked=0, applied=260, latency_p99_ms=120.0, latency_p50_ms=45.0),
        Second(t=5, acked=0, applied=12, latency_p99_ms=60.0, latency_p50_ms=40.0),
    ]
    faults = [
        Fault("consumer_kill", 1.5, 2.0, "consumer 2 (pid 1234) killed -9, restarted", True),
        Fault("db_connections", 3.2, 0.4, "terminated 6 backends <pg_terminate_backend>", True),
    ]
    checks = [
        Check("oversold units", "0", "0", True),
        Check("lost events", "0", "0", True),
        Check("orders match their histories", "all 500", "498", False),
    ]
    report = Report(
        started_at="2026-05-01T12:00:00Z",
        config={"intents": 500, "duplicates": 3, "reorder": 0.2, "via": "http", "chaos": True},
        services={"kafka": "embedded tansu at 127.0.0.1:1234", "postgres": "embedded 18.1"},
        events_distinct=1442,
        deliveries=1310,
        attempts=1380,
        retried=70,
        duplicates_absorbed=0,
        lost_events=0,
        duplicate_orders=0,
        oversold_units=0,
        orders_expected={"placed|out_of_stock": 300, "captured": 150, "canceled": 50},
        orders_found={"placed": 250, "out_of_stock": 50, "captured": 148, "canceled": 50},
        stock_expected=1200,
        stock_found=1200,
        elapsed_s=5.8,
        events_per_s=248.6,
        deliveries_per_s=225.9,
        latency_ms={"p50": 41.0, "p95": 700.0, "p99": 2300.0, "max": 2600.0, "count": 1442},
        latency_source="commit timestamp",
        timeline=timeline,
        faults=faults,
        checks=checks,
        ok=False,
    )
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def svg(page: str, chart_id: str) -> str:
    found = re.search(rf'<svg id="{chart_id}".*?</svg>', page, re.DOTALL)
    assert found, chart_id
    return found.group(0)


def test_json_has_the_documented_paths_and_survives_json_dumps(tmp_path: Path) -> None:
    data = to_json(sample())
    assert json.loads(json.dumps(data)) == data
    assert data["latency_ms"]["p99"] == 2300.0
    assert data["oversold_units"] == 0
    assert data["events_per_s"] == 248.6
    assert data["timeline"][2] == {
        "t": 2,
        "acked": 410,
        "applied": 0,
        "latency_p99_ms": None,
        "latency_p50_ms": None,
    }
    assert data["faults"][0]["kind"] == "consumer_kill"
    assert data["checks"][2]["ok"] is False
    write_json(sample(), tmp_path / "out" / "report.json")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == data


def test_json_turns_what_json_cannot_hold_into_text_or_null() -> None:
    data = to_json(sample(config={"path": Path("/tmp/x"), "rate": float("inf")}))
    assert data["config"] == {"path": "/tmp/x", "rate": None}


def test_merged_expected_statuses_are_compared_with_the_sum_of_their_parts() -> None:
    rows = order_rows(sample(orders_found={"placed": 250, "out_of_stock": 50, "refunded": 2}))
    assert rows == [
        ("placed|out_of_stock", 300, 300),
        ("captured", 150, 0),
        ("canceled", 50, 0),
        ("refunded", 0, 2),
    ]


def test_ticks_are_round_and_cover_the_highest_value() -> None:
    assert nice_ticks(2600) == [0, 1000, 2000, 3000]
    assert nice_ticks(5) == [0, 2, 4, 6]
    assert nice_ticks(0) == [0, 0.5, 1.0]
    assert nice_ticks(4) == [0, 1, 2, 3, 4]


def test_html_page_is_self_contained_with_three_charts_and_the_faults_marked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.html"
    write_html(sample(), path)
    page = path.read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    for chart_id in ("chart-throughput", "chart-latency"):
        chart = svg(page, chart_id)
        assert chart.count('<g class="fault">') == 2
        assert ">consumer_kill</text>" in chart and ">db_connections</text>" in chart
        assert "<polyline" in chart
    assert svg(page, "chart-latency").count("<polyline") == 4  # p50 and p99, broken at t=2
    assert svg(page, "chart-orders").count('class="bar"') == 2 * 3
    assert "CHECKS FAILED: orders match their histories" in page
    assert "&lt;pg_terminate_backend&gt;" in page and "<pg_terminate_backend>" not in page


def test_html_page_draws_an_empty_run_without_failing(tmp_path: Path) -> None:
    path = tmp_path / "empty.html"
    empty = sample(timeline=[], faults=[], orders_expected={}, orders_found={}, latency_ms={})
    write_html(empty, path)
    page = path.read_text()
    for chart_id in ("chart-throughput", "chart-latency", "chart-orders"):
        assert "no " in svg(page, chart_id)
    assert "none injected" in page


def test_summary_names_the_invariants_and_the_failed_check() -> None:
    console = Console(record=True, width=120)
    print_summary(sample(), console)
    text = console.export_text()
    assert "oversold units" in text and "lost events" in text
    assert "orders placed|out_of_stock" in text
    assert "consumer_kill" in text and "survived" in text
    assert "orders match their histories" in text
    assert text.rstrip().endswith("CHECKS FAILED: orders match their histories")


def test_the_parts_of_a_merged_status_are_indented_under_it_in_the_terminal() -> None:
    console = Console(record=True, width=120)
    print_summary(sample(), console)
    lines = console.export_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "orders placed|out_of_stock" in line)
    parent, placed, out_of_stock = lines[at : at + 3]
    indent = parent.index("orders")
    assert placed.index("of which placed") > indent
    assert out_of_stock.index("of which out_of_stock") > indent
    assert "orders captured" in lines[at + 3]  # the next status follows the parts


def test_the_parts_of_a_merged_status_are_indented_under_it_in_the_page(tmp_path: Path) -> None:
    write_html(sample(), tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    rows = re.findall(r"<tr( class=\"part\")?><td>([^<]*)</td>", page)
    at = rows.index(("", "orders placed|out_of_stock"))
    assert rows[at + 1 : at + 4] == [
        (' class="part"', "of which placed"),
        (' class="part"', "of which out_of_stock"),
        ("", "orders captured"),
    ]
    assert "tr.part td:first-child { padding-left:" in page


def test_rates_name_their_unit_in_the_terminal_and_in_the_chart_legend(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    print_summary(sample(), console)
    text = console.export_text()
    assert "throughput applied, events/s" in text
    assert "throughput acknowledged, deliveries/s" in text
    write_html(sample(), tmp_path / "report.html")
    chart = svg((tmp_path / "report.html").read_text(), "chart-throughput")
    assert ">acknowledged, deliveries/s</text>" in chart and ">applied, events/s</text>" in chart
    assert "acknowledged/s" not in chart and "applied/s" not in chart
    xs = [float(x) for x in re.findall(r'<text x="([0-9.]+)" y="16"', chart)]
    assert xs[1] - xs[0] > 7 * len("acknowledged, deliveries/s")  # the legends do not overlap


def test_settings_are_printed_plainly_not_as_json(tmp_path: Path) -> None:
    config = {
        "rate": "max",
        "chaos": "none",
        "reorder": 0.2,
        "chaos_all": True,
        "kinds": ["a", "b"],
    }
    write_html(sample(config=config), tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "&quot;" not in page.split("configuration and services")[1].split("</table>")[0]
    for key, shown in (
        ("rate", "max"),
        ("chaos", "none"),
        ("reorder", "0.2"),
        ("chaos_all", "yes"),
        ("kinds", "a, b"),
    ):
        assert f"<tr><td>{key}</td><td>{shown}</td></tr>" in page


def test_summary_ends_with_every_check_held_when_they_did() -> None:
    console = Console(record=True, width=120)
    held = [Check("oversold units", "0", "0", True)]
    print_summary(sample(checks=held, ok=True), console)
    assert console.export_text().rstrip().endswith("every check held")


def test_summary_piped_into_a_file_has_no_terminal_codes() -> None:
    out = io.StringIO()
    print_summary(sample(), Console(file=out, width=100))
    assert "\x1b[" not in out.getvalue()
    assert "CHECKS FAILED" in out.getvalue()


def test_progress_off_a_terminal_prints_a_line_every_interval_not_every_update() -> None:
    out = io.StringIO()
    now = [0.0]
    with Progress(deliveries=1000, events=400, file=out, every_s=5.0, clock=lambda: now[0]) as p:
        for i in range(1000):
            now[0] = i * 0.01  # ten seconds of updates
            p.update(sent=i + 1, acked=i, applied=i // 3)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 4
    assert lines[-1].startswith("sent 1,000/1,000")
    assert "\x1b[" not in out.getvalue()
