"""A real Chromium and a real server on real time: a task scheduled in the
form shows its next runs, and the scheduler makes its run when the minute turns."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tests.browser import DESKTOP, chromium_page, log_in
from tests.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def test_a_task_scheduled_in_the_form_shows_its_next_runs_and_fires(master, start_agent):
    start_agent("cron-agent")
    with chromium_page(DESKTOP) as page:
        log_in(page, master, then="/tasks/new/")
        page.fill("input[name=name]", "every-minute")
        page.fill("textarea[name=command]", "echo tick")
        page.fill("input[name=schedule]", "* * * * *")
        page.fill("input[name=timezone]", "America/New_York")
        page.click("button:has-text('Create task')")
        page.wait_for_url(re.compile(r"/tasks/\d+/$"))

        times = page.locator("#next-runs time")
        assert times.count() == 5
        firsts = [
            dt.datetime.fromisoformat(t)
            for t in times.evaluate_all("els => els.map(e => e.getAttribute('datetime'))")
        ]
        # A minute apart, in New York's offset (-05:00 or -04:00), starting within a minute.
        gaps = [b - a for a, b in zip(firsts, firsts[1:], strict=False)]
        assert gaps == [dt.timedelta(minutes=1)] * 4
        assert firsts[0].utcoffset() in (dt.timedelta(hours=-5), dt.timedelta(hours=-4))
        now = dt.datetime.now(dt.UTC)
        assert dt.timedelta(0) < firsts[0] - now <= dt.timedelta(minutes=1, seconds=1)
        assert page.locator("#schedule-toggle").inner_text() == "Pause schedule"
        task_url = page.url

        # The one wait for the minute to turn: the scheduler's run shows in the history.
        def scheduled_run():
            page.goto(task_url)
            cell = page.locator("#task-history td:has-text('schedule')")
            return cell.count() > 0

        wait_for(scheduled_run, timeout=90, interval=2, what="a run made by the schedule")
        page.locator("#task-history tbody tr a").first.click()
        page.wait_for_url(f"{master.url}/runs/*/")
        page.locator("#run-status.succeeded").wait_for(timeout=30_000)
        assert page.locator("section.attempt .line[data-stream=stdout]").all_inner_texts() == [
            "tick"
        ]
        assert page.locator("#scheduled-for").is_visible()

    runs = master.api("GET", "runs?limit=50").json()["results"]
    ticks = [dt.datetime.fromisoformat(r["scheduled_for"]) for r in reversed(runs)]
    assert {r["trigger"] for r in runs} == {"schedule"}
    # The first tick shown on the page, then the next ones: each once.
    assert ticks == firsts[: len(ticks)]
