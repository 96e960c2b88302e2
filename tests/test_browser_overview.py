"""A real Chromium in another time zone: times in its zone, the overview's chart."""

from __future__ import annotations

import itertools
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from tests.browser import chromium_page, log_in, task_page

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ZONE = "Asia/Kolkata"  # UTC+05:30 all year: no date of the test moves it


def test_times_show_in_the_viewers_zone_with_utc_on_hover_and_the_chart_counts_the_run(
    master, start_agent
):
    start_agent("overview-agent")
    with chromium_page(name="browser-overview", timezone_id=ZONE) as page:
        log_in(page, master, then="/tasks/new/")
        page.fill("input[name=name]", "answer")
        page.fill("textarea[name=command]", f'{sys.executable} -c "print(42)"')
        page.click("button:has-text('Create task')")
        page.wait_for_url(task_page(master))
        page.click("#run-task")
        page.wait_for_url(f"{master.url}/runs/*/")
        page.locator("#run-status.succeeded").wait_for()

        created = page.locator("dt:has-text('Created') + dd time")
        instant = datetime.fromisoformat(created.get_attribute("datetime"))
        # The script wrote the browser's zone; the server's UTC stays on hover.
        page.wait_for_function("document.querySelector('dt + dd time[data-localized]') !== null")
        local = instant.astimezone(ZoneInfo(ZONE))
        assert created.inner_text().startswith(f"{local:%Y-%m-%d %H:%M:%S} ")
        assert created.inner_text() != f"{instant:%Y-%m-%d %H:%M:%S} UTC"
        assert created.get_attribute("title") == f"{instant:%Y-%m-%d %H:%M:%S} UTC"
        attempt_clock = page.locator(".attempt time[data-local=time]").first
        shown = datetime.fromisoformat(attempt_clock.get_attribute("datetime"))
        assert attempt_clock.inner_text() == f"{shown.astimezone(ZoneInfo(ZONE)):%H:%M:%S}"

        page.click("nav a:has-text('Overview')")
        page.wait_for_url(f"{master.url}/")
        assert page.locator("#total-hour").inner_text() == "(1)"
        bar = page.locator("#chart-hour rect.bar.succeeded")
        assert bar.count() == 1
        assert bar.locator("title").text_content().endswith("UTC: 1 succeeded")
        assert page.locator("#task-health tr[data-task] td.runs").inner_text() == "1"

        # On a phone the bars narrow, and the axis' labels keep their size and
        # stay apart, inside the chart.
        wide = _label_boxes(page)
        page.set_viewport_size({"width": 390, "height": 844})
        narrow = _label_boxes(page)
        assert len(narrow) == len(wide) >= 3
        assert [round(b["width"]) for b in narrow] == [round(b["width"]) for b in wide]
        assert [round(b["height"]) for b in narrow] == [round(b["height"]) for b in wide]
        chart = page.locator("#chart-hour").bounding_box()
        assert chart["width"] < 390
        for left, right in itertools.pairwise(narrow):
            assert left["x"] + left["width"] < right["x"], (left, right)
        assert narrow[0]["x"] >= chart["x"]
        assert narrow[-1]["x"] + narrow[-1]["width"] <= chart["x"] + chart["width"] + 0.5


def _label_boxes(page) -> list[dict]:
    labels = page.locator("#chart-hour .chart-x .tick")
    return [labels.nth(i).bounding_box() for i in range(labels.count())]
