"""The server-drawn SVG charts (tasks_app/charts.py): one bar per bucket and status."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from tasks_app.charts import Bucket, sparkline, stacked_bars

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STATUSES = ["succeeded", "failed", "cancelled", "skipped"]


def buckets(*counts: dict) -> list[Bucket]:
    return [
        Bucket(T0 + i * timedelta(minutes=1), f"12:{i:02d} UTC", dict(c))
        for i, c in enumerate(counts)
    ]


def bars_of(chart) -> ET.Element:
    """The SVG of a chart's <figure>."""
    figure = ET.fromstring(str(chart))
    assert figure.tag == "figure"
    return figure.find("svg")


def test_it_draws_one_titled_bar_per_bucket_and_status_that_has_runs():
    data = buckets({"succeeded": 3, "failed": 1}, {}, {"cancelled": 2, "succeeded": 1})

    svg = bars_of(stacked_bars(data, STATUSES, title="Runs", chart_id="c"))

    bars = [
        (r.get("class"), r.find("title").text) for r in svg.iter("rect") if r.get("class") != "hit"
    ]
    assert bars == [
        ("bar succeeded", "12:00 UTC: 3 succeeded"),
        ("bar failed", "12:00 UTC: 1 failed"),
        ("bar succeeded", "12:02 UTC: 1 succeeded"),
        ("bar cancelled", "12:02 UTC: 2 cancelled"),
    ]
    groups = svg.findall("g")
    assert [g.get("data-total") for g in groups] == ["4", "0", "3"]
    assert [g.find("rect").find("title").text for g in groups] == [
        "12:00 UTC: 3 succeeded, 1 failed",
        "12:01 UTC: none",
        "12:02 UTC: 1 succeeded, 2 cancelled",
    ]
    assert svg.get("role") == "img" and svg.get("aria-labelledby") == "c-title c-desc"
    assert svg.find("title").text == "Runs"
    assert svg.find("desc").text == "7 runs: 4 succeeded, 1 failed, 2 cancelled."


def test_it_stacks_a_buckets_bars_to_its_share_of_the_tallest_bucket():
    data = buckets({"succeeded": 2}, {"succeeded": 1, "failed": 1}, {"failed": 1})

    svg = bars_of(stacked_bars(data, STATUSES, title="Runs"))

    heights = [
        [float(r.get("height")) for r in g.findall("rect") if r.get("class") != "hit"]
        for g in svg.findall("g")
    ]
    full = heights[0][0]
    assert heights == [[full], [full / 2, full / 2], [full / 2]]
    # Stacked: the failed bar of the second bucket sits on its succeeded bar.
    second = [r for r in svg.findall("g")[1].findall("rect") if r.get("class") != "hit"]
    assert float(second[1].get("y")) + float(second[1].get("height")) == float(second[0].get("y"))


def test_its_figures_and_labels_are_html_beside_the_svg_so_they_never_stretch_with_it():
    data = buckets(*[{"succeeded": n} for n in (1, 5, 2, 0)])

    figure = ET.fromstring(str(stacked_bars(data, STATUSES, title="Runs", ticks=TICKS)))

    # The SVG stretches to its box (bars may), and holds no text that would.
    svg = figure.find("svg")
    assert svg.get("preserveAspectRatio") == "none"
    assert svg.findall(".//text") == []
    y_axis, x_axis = figure.findall("div")
    assert [t.text for t in y_axis.findall("span")] == ["5", "0"]
    # Each label under the middle of its bucket; the outer ones held inside.
    assert [(t.text, t.get("class"), t.get("style")) for t in x_axis.findall("span")] == [
        ("12:00", "tick start", "left: 12.50%"),
        ("12:02", "tick middle", "left: 62.50%"),
        ("12:03", "tick end", "left: 87.50%"),
    ]


TICKS = [(0, "12:00"), (2, "12:02"), (3, "12:03")]


def test_it_escapes_what_it_writes_into_the_svg():
    data = [Bucket(T0, "<b>&", {"failed": 1})]

    svg = str(stacked_bars(data, STATUSES, title='runs "of" <x>'))

    assert "<b>" not in svg and "&lt;b&gt;&amp;: 1 failed" in svg
    ET.fromstring(svg)  # still well-formed


def test_a_sparkline_has_a_titled_dot_per_point_scaled_to_the_largest():
    svg = ET.fromstring(str(sparkline([(1.0, "#1: 1.0 s"), (4.0, "#2: 4.0 s")], title="Trend")))

    dots = svg.findall("circle")
    assert [d.find("title").text for d in dots] == ["#1: 1.0 s", "#2: 4.0 s"]
    # The largest value at the top (y = padding), a quarter of it lower.
    assert float(dots[1].get("cy")) == 4.0
    assert float(dots[0].get("cy")) == 48 - 4 - 0.25 * 40
    assert str(sparkline([], title="Trend")) == ""
