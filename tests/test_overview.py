"""The overview (the home page) and the task page's strip and trend.

Runs are written with known statuses and times; the tests read the numbers
the pages print. The percentile tests run on both engines (PostgreSQL's
percentile_cont, SQLite's sample computed in Python) and expect the same.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks_app import overview, tokens
from tasks_app.models import Attempt, Run, Task
from workers_app.models import Worker

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}
NOW = datetime(2026, 3, 1, 12, 30, 20, tzinfo=UTC)


def run(task: Task, status: str, finished=None, seconds: float | None = 1.0, **fields) -> Run:
    """A run of `task` that ended (or not) with `status` at `finished`, after `seconds`."""
    started = finished - timedelta(seconds=seconds) if finished and seconds is not None else None
    return Run.objects.create(
        task=task,
        task_name=task.name,
        definition={},
        status=status,
        started_at=started,
        finished_at=finished,
        **fields,
    )


def section(html: str, region: str) -> str:
    start = html.index(f'<section class="card overview-{region}" id="overview-{region}"')
    return html[start : html.index("</section>", start) + len("</section>")]


def text(fragment: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", fragment).split())


@pytest.fixture
def nightly():
    return Task.objects.create(name="nightly", command="true")


# --- the charts' figures -------------------------------------------------------------


def test_it_counts_runs_finished_per_minute_and_per_hour_by_status(nightly):
    at = NOW.replace(minute=5, second=10)
    for _ in range(3):
        run(nightly, "succeeded", at)
    run(nightly, "failed", at + timedelta(seconds=40))
    run(nightly, "cancelled", NOW.replace(minute=29, second=59))
    run(nightly, "cancelled", NOW.replace(minute=29, second=0))
    run(nightly, "skipped", NOW.replace(second=1))  # this minute: the last bucket
    run(nightly, "succeeded", NOW - timedelta(minutes=59, seconds=30))  # before the hour's window
    run(nightly, "failed", NOW - timedelta(hours=23, minutes=20))  # in the day's first hour
    run(nightly, "failed", NOW - timedelta(hours=25))  # outside both
    run(nightly, "running")
    run(nightly, "queued")

    hour = overview.finished_series(overview.LAST_HOUR, NOW)
    day = overview.finished_series(overview.LAST_DAY, NOW)

    assert len(hour) == 60 and len(day) == 24
    assert hour[0].start == datetime(2026, 3, 1, 11, 31, tzinfo=UTC)
    by_label = {b.label: b.counts for b in hour if b.counts}
    assert by_label == {
        "12:05 UTC": {"succeeded": 3, "failed": 1},
        "12:29 UTC": {"cancelled": 2},
        "12:30 UTC": {"skipped": 1},
    }
    assert sum(b.total for b in hour) == 7
    assert day[0].start == datetime(2026, 2, 28, 13, 0, tzinfo=UTC)
    assert day[0].counts == {"failed": 1}
    assert day[-2].counts == {"succeeded": 1}  # 11:30:50
    assert day[-1].counts == {"succeeded": 3, "failed": 1, "cancelled": 2, "skipped": 1}
    assert sum(b.total for b in day) == 9
    # The page's day chart, added up from the per-task rollup, says the same.
    assert [b.counts for b in overview.DayRollup(NOW).series()] == [b.counts for b in day]


def test_it_says_how_many_runs_are_queued_and_running(nightly):
    for status in ("queued", "queued", "running", "succeeded"):
        run(nightly, status, timezone.now() if status == "succeeded" else None)

    assert overview.now_counts() == {"queued": 2, "running": 1}


# --- percentiles, on both engines ------------------------------------------------------


def test_it_computes_success_rate_and_interpolated_percentiles_per_task(nightly):
    other = Task.objects.create(name="hourly", command="true")
    for seconds in range(1, 101):  # 1 s .. 100 s, every 10th failed
        status = "failed" if seconds % 10 == 0 else "succeeded"
        run(nightly, status, NOW - timedelta(minutes=seconds), seconds)
    run(nightly, "cancelled", NOW - timedelta(minutes=1), 5000)  # left out of the durations
    run(nightly, "succeeded", NOW - timedelta(hours=25), 9000)  # before the window
    run(other, "succeeded", NOW - timedelta(minutes=3), 2)
    run(other, "succeeded", NOW - timedelta(minutes=4), 4)

    first, second = overview.task_health(NOW)

    assert (first.name, first.runs, first.succeeded, first.failed) == ("nightly", 101, 90, 10)
    assert first.success_rate == 90.0
    # percentile_cont: the value at 0.5 * 99 = 49.5 between the 50th and 51st
    # (50.5 s); at 0.95 * 99 = 94.05, 95 s + 0.05 of a second.
    assert first.p50.total_seconds() == pytest.approx(50.5)
    assert first.p95.total_seconds() == pytest.approx(95.05)
    assert (second.name, second.runs, second.p50, second.p95) == (
        "hourly",
        2,
        timedelta(seconds=3),
        timedelta(seconds=3.9),
    )


@pytest.mark.skipif("connection.vendor != 'sqlite'", reason="PostgreSQL reads every run")
def test_on_sqlite_the_percentiles_come_from_each_tasks_newest_runs(nightly, monkeypatch):
    monkeypatch.setattr(overview, "SAMPLE", 10)
    for minutes in range(60, 40, -1):  # 20 older runs of 100 s
        run(nightly, "succeeded", NOW - timedelta(minutes=minutes), 100)
    for minutes in range(10, 0, -1):  # the 10 newest: 1 s
        run(nightly, "succeeded", NOW - timedelta(minutes=minutes), 1)

    [health] = overview.task_health(NOW)

    assert health.runs == 30
    assert (health.p50, health.p95) == (timedelta(seconds=1), timedelta(seconds=1))


def test_percentile_cont_interpolates_like_postgresql():
    assert overview.percentile_cont([5.0], 0.95) == 5.0
    assert overview.percentile_cont([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert overview.percentile_cont([0.0, 10.0], 0.95) == pytest.approx(9.5)


# --- the page ----------------------------------------------------------------------------


def test_the_overview_shows_known_runs_failures_tasks_and_workers(bob_client, nightly):
    now = timezone.now()
    two_minutes_ago = now - timedelta(minutes=2)
    run(nightly, "queued")
    run(nightly, "queued")
    running = run(nightly, "running")
    run(nightly, "succeeded", two_minutes_ago, 2)
    run(nightly, "succeeded", two_minutes_ago, 4)
    old = run(nightly, "failed", now - timedelta(hours=3), 1, reason="exit code 3")
    new = run(nightly, "failed", two_minutes_ago, 6, reason="timed out after 5s")
    busy = Worker.objects.create(
        name="busy-1", capacity=4, state="online", credential_hash=tokens.digest("a")
    )
    Worker.objects.create(name="idle-1", capacity=2, state="online", credential_hash="b")
    Worker.objects.create(name="gone-1", capacity=2, state="offline", credential_hash="c")
    for _ in range(3):
        Attempt.objects.create(run=running, worker=busy, status="running", try_number=_ + 1)
    for minutes in (10, 20, 90):
        Attempt.objects.create(
            run=new,
            worker=busy,
            status="succeeded",
            try_number=10 + minutes,
            finished_at=now - timedelta(minutes=minutes),
        )

    html = bob_client.get("/").content.decode()

    assert '<a href="/" class="active">Overview</a>' in html
    assert text(section(html, "now")) == "Now Queued 2 Running 1"
    activity = section(html, "activity")
    assert '<span class="muted" id="total-hour">(3)</span>' in activity
    assert '<span class="muted" id="total-day">(4)</span>' in activity
    label = f"{two_minutes_ago.astimezone(UTC):%H:%M} UTC"
    assert f"<title>{label}: 2 succeeded</title>" in activity
    assert f"<title>{label}: 1 failed</title>" in activity
    failures = section(html, "failures")
    assert re.findall(r'<li data-run="(\d+)"><a href="/runs/(\d+)/">', failures) == [
        (str(new.pk), str(new.pk)),
        (str(old.pk), str(old.pk)),
    ]
    assert re.findall(r'<span class="reason">([^<]+)</span>', failures) == [
        "timed out after 5s",
        "exit code 3",
    ]
    tasks = text(section(html, "tasks"))
    # 4 finished in the day, 2 of them succeeded; durations 1, 2, 4, 6 s.
    assert "nightly 4 50% (2/4) 3.0 s 5.7 s" in tasks
    workers = section(html, "workers")
    busiest = workers[workers.index('id="busiest-workers"') : workers.index('id="idle-workers"')]
    idle = workers[workers.index('id="idle-workers"') :]
    row = r'<tr data-worker="([^"]+)"><td>[^<]+</td><td class="num slots">([^<]+)</td>'
    row += r'<td class="num finished">(\d+)</td>'
    assert re.findall(row, busiest) == [("busy-1", "3 / 4", "2")]  # 2 finished in the hour
    assert re.findall(row, idle) == [("idle-1", "0 / 2", "0")]
    assert "gone-1" not in workers


def test_each_region_names_a_url_that_returns_it_alone(bob_client, nightly):
    run(nightly, "failed", timezone.now(), 1, reason="boom")
    page = bob_client.get("/").content.decode()
    regions = re.findall(
        r'<section class="card overview-([a-z]+)" id="overview-\1" data-live-src="([^"]+)" '
        r'data-live-on="([a-z ]+)"',
        page,
    )
    assert [name for name, _, _ in regions] == ["now", "failures", "activity", "tasks", "workers"]

    for name, url, on in regions:
        partial = bob_client.get(url.replace("&amp;", "&"), headers=HTMX).content.decode()

        assert "<html" not in partial
        assert partial.strip() == section(page, name)
        # Topics that change what it shows: slots in use move with attempts alone.
        assert on == ("attempts workers" if name == "workers" else "runs")


def test_it_refuses_an_unknown_region_with_a_400(bob_client):
    response = bob_client.get("/?part=nope", headers=HTMX)

    assert response.status_code == 400
    assert response.content.decode() == (
        "Unknown part 'nope': one of now, activity, tasks, workers, failures."
    )


def test_the_overview_reads_the_same_number_of_queries_for_any_number_of_runs(bob_client, nightly):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert bob_client.get("/").status_code == 200
        return len(captured)

    now = timezone.now()
    for i in range(3):
        run(nightly, "failed", now - timedelta(minutes=i), reason="x")
    few = queries()
    for i in range(40):
        other = Task.objects.create(name=f"t{i}", command="true")
        run(other, ["succeeded", "failed", "cancelled"][i % 3], now - timedelta(minutes=i))

    assert queries() == few


# --- the task page --------------------------------------------------------------------------


def test_the_task_page_shows_its_last_50_runs_as_marks_oldest_first(bob_client, nightly):
    now = timezone.now()
    statuses = ["succeeded", "failed", "cancelled", "running", "queued"]
    runs = []
    for i in range(55):
        status = statuses[i % 5]
        finished = now - timedelta(minutes=60 - i) if status not in ("running", "queued") else None
        runs.append(run(nightly, status, finished, seconds=i + 1))

    html = bob_client.get(f"/tasks/{nightly.pk}/").content.decode()

    strip = html[html.index('<ol class="run-strip"') : html.index("</ol>", html.index("run-strip"))]
    marks = re.findall(
        r'<a class="mark (\w+)" href="/runs/(\d+)/" data-run="\d+" title="([^"]+)"', strip
    )
    assert [int(pk) for _, pk, _ in marks] == [r.pk for r in runs[5:]]
    assert [status for status, _, _ in marks] == [r.status for r in runs[5:]]
    assert marks[0][2] == f"#{runs[5].pk} succeeded, 6.0 s"
    assert marks[-1][2] == f"#{runs[54].pk} queued"
    assert "Its last 50 runs, oldest first" in html
    # The trend: one dot per run of the strip that has a duration, oldest first.
    dots = re.findall(r'<circle class="dot" [^>]+><title>([^<]+)</title>', html)
    assert dots[0] == f"#{runs[5].pk} succeeded: 6.0 s"
    assert len(dots) == 30  # 3 of every 5 finished


def test_the_task_pages_stats_region_names_a_url_that_returns_it_alone(bob_client, nightly):
    run(nightly, "failed", timezone.now(), 3)
    run(nightly, "succeeded", timezone.now(), 1)
    page = bob_client.get(f"/tasks/{nightly.pk}/").content.decode()
    start = page.index('<section class="card" id="task-stats"')
    region = page[start : page.index("</section>", start) + len("</section>")]
    [url] = re.findall(r'data-live-src="([^"]+)" data-live-on="task:\d+"', region)

    partial = bob_client.get(url, headers=HTMX).content.decode()

    assert url == f"/tasks/{nightly.pk}/?part=stats"
    assert partial.strip() == region
    assert "50% <span" in partial and 'class="mark failed"' in partial
