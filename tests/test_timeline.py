"""A run's timeline: each event kind in words, and the run page's `timeline` partial."""

from __future__ import annotations

import datetime as dt
import re
from html import unescape

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks_app import events as E
from tasks_app import lifecycle, timeline
from tasks_app.lifecycle import Result
from tasks_app.models import Event, Task
from workers_app.models import Worker

T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def event(kind: str, seconds: float = 0.0, **data) -> Event:
    return Event(id=1, kind=kind, at=T0 + dt.timedelta(seconds=seconds), data=data)


@pytest.mark.parametrize(
    ("kind", "data", "text"),
    [
        (E.RUN_QUEUED, {"trigger": "manual"}, "queued"),
        (E.RUN_QUEUED, {"trigger": "schedule"}, "queued (schedule)"),
        (E.RUN_QUEUED, {"trigger": "retry", "retry_of": 7}, "queued as a retry of run #7"),
        (
            E.RUN_QUEUED,
            {"trigger": "manual", "held": True},
            "queued, held by the task's concurrency limit",
        ),
        (E.ATTEMPT_ASSIGNED, {"worker": "w1"}, "assigned to w1"),
        (E.ATTEMPT_ACCEPTED, {}, "accepted"),
        (E.ATTEMPT_STARTED, {"pid": 123}, "started (pid 123)"),
        (E.RUN_STARTED, {}, "run started"),
        (
            E.ATTEMPT_FINISHED,
            {"status": "succeeded", "exit_code": 0, "reason": "", "output_bytes": 1229},
            "finished: exit 0 (1.2 KB of output)",
        ),
        (
            E.ATTEMPT_FINISHED,
            {"status": "failed", "exit_code": 3, "reason": "exit code 3", "output_bytes": 0},
            "finished: exit 3 (no output)",
        ),
        (
            E.ATTEMPT_FINISHED,
            {"status": "cancelled", "exit_code": -15, "reason": "", "output_bytes": 20},
            "cancelled: killed by SIGTERM (20 bytes of output)",
        ),
        (
            E.ATTEMPT_FINISHED,
            {"status": "timed_out", "reason": "timed out after 5s"},
            "timed out: timed out after 5s",
        ),
        (
            E.ATTEMPT_FINISHED,
            {"status": "cancelled", "reason": "cancelled"},
            "cancelled",
        ),
        (
            E.ATTEMPT_QUEUED,
            {"try_number": 2, "shard_index": 0, "delay_s": 4.0},
            "retried as attempt 2 in 4 s",
        ),
        (
            E.ATTEMPT_QUEUED,
            {"try_number": 3, "shard_index": 0, "delay_s": 2.53},
            "retried as attempt 3 in 2.5 s",
        ),
        (E.ATTEMPT_QUEUED, {"merge": True}, "merge queued"),
        (
            E.ATTEMPT_REQUEUED,
            {"reason": "rejected by the agent", "delay_s": 1.0},
            "handed back: rejected by the agent, offered again in 1 s",
        ),
        (
            E.ATTEMPT_LOST,
            {"reason": "worker lost: no heartbeat for 15s"},
            "lost: worker lost: no heartbeat for 15s",
        ),
        (
            E.ATTEMPT_SUPERSEDED,
            {"status": "succeeded", "exit_code": 0, "reason": "", "closed_as": "lost"},
            "late report ignored: the agent said succeeded, exit 0",
        ),
        (
            E.RUN_FINISHED,
            {"status": "succeeded", "reason": "", "duration_s": 1.25},
            "run succeeded after 1.2 s",
        ),
        (
            E.RUN_FINISHED,
            {"status": "skipped", "reason": "skipped: run #3 still running", "duration_s": None},
            "run skipped: skipped: run #3 still running",
        ),
        (E.RUN_CANCEL_REQUESTED, {"by": "bob"}, "cancel requested by bob"),
        (E.RUN_RETRIED, {"new_run_id": 12}, "retried as run #12"),
        (E.WORKER_ONLINE, {"name": "w1", "state": "draining"}, "worker w1 online (draining)"),
        (
            E.WORKER_OFFLINE,
            {"name": "w1", "reason": "disconnected"},
            "worker w1 offline: disconnected",
        ),
        (E.WORKER_APPROVED, {"name": "w1", "by": "alice"}, "worker w1 approved by alice"),
        (E.SCHEDULER_PAUSED, {"by": "bob"}, "scheduler paused by bob"),
        (E.TASK_DELETED, {"name": "nightly"}, "task nightly deleted"),
    ],
)
def test_it_describes_each_event_in_words(kind, data, text):
    assert timeline.describe(event(kind, **data)) == text


def test_every_kind_has_words_of_its_own():
    for kind in E.KINDS:
        assert timeline.describe(event(kind)) != kind, kind


def test_each_line_says_how_long_after_the_one_before():
    rows = [
        event(E.RUN_QUEUED, 0.0, trigger="manual"),
        event(E.ATTEMPT_ASSIGNED, 0.8, worker="w1"),
        event(E.ATTEMPT_STARTED, 2.05, pid=9),
    ]
    rows[2].attempt_id = 5

    lines = timeline.lines(rows, {5: "shard 2"})

    assert [(line.text, line.since) for line in lines] == [
        ("queued", None),
        ("assigned to w1", pytest.approx(0.8)),
        ("shard 2: started (pid 9)", pytest.approx(1.25)),
    ]


# --- the run page -------------------------------------------------------------------


def timeline_lines(html: str) -> list[tuple[str, str | None]]:
    """(what, +since) of each line of the page's timeline."""
    section = re.search(r'<section class="card" id="timeline">(.*?)</section>', html, re.S)
    assert section, "the page has no timeline"
    found = []
    for item in re.findall(r"<li [^>]*>(.*?)</li>", section.group(1), re.S):
        what = re.search(r'<span class="what">(.*?)</span>', item, re.S).group(1)
        since = re.search(r'<span class="since"[^>]*>(.*?)</span>', item, re.S)
        found.append((unescape(what), since and unescape(since.group(1))))
    return found


@pytest.mark.django_db
def test_the_run_page_shows_the_runs_timeline_from_one_query(bob_client, worker):
    task = Task.objects.create(name="report", command="true", max_retries=1)
    worker.state, worker.approved_at = Worker.State.ONLINE, timezone.now()
    worker.save()
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 123)
    now = timezone.now().timestamp()
    lifecycle.finish(
        worker.pk, attempt.pk, Result("failed", 1, "exit code 1", now - 1, now, output_bytes=2048)
    )

    with CaptureQueriesContext(connection) as queries:
        html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    lines = timeline_lines(html)
    assert [what for what, _ in lines][:6] == [
        "queued",
        "assigned to node-1",
        "accepted",
        "started (pid 123)",
        "run started",
        "finished: exit 1 (2.0 KB of output)",
    ]
    assert lines[6][0].startswith("retried as attempt 2 in ")
    assert lines[0][1] is None
    assert all(since.startswith("+") for _, since in lines[1:])
    # One read of the run's events (the other reading the table is the live
    # socket's starting point: the newest event id, tasks_app.live.LiveSince).
    table = Event._meta.db_table
    reads = [q["sql"] for q in queries.captured_queries if table in q["sql"]]
    assert sum("run_id" in sql for sql in reads) == 1, reads
    # The partial renders alone by name, as a live page re-renders it.
    assert 'id="timeline"' in html


@pytest.mark.django_db
def test_the_timeline_partial_renders_alone_by_name(rf, bob, task):
    from django.template.loader import render_to_string

    from tasks_app.views import timeline_context

    run = lifecycle.trigger_run(task)
    html = render_to_string(
        "tasks/run_detail.html#timeline", {"run": run, **timeline_context(run, {})}
    )

    assert html.strip().startswith('<section class="card" id="timeline">')
    assert timeline_lines(html) == [("queued", None)]


# --- GET /api/runs/<id>/events ---------------------------------------------------------


@pytest.mark.django_db
def test_the_api_lists_a_runs_events_oldest_first_a_page_at_a_time(api, task):
    run = lifecycle.trigger_run(task)
    lifecycle.cancel_run(run, by="bob")
    ids = list(Event.objects.filter(run_id=run.pk).values_list("id", flat=True))

    first = api.get(f"/api/runs/{run.pk}/events?limit=2").json()
    rest = api.get(first["next"]).json()

    assert [e["kind"] for e in first["results"]] == [E.RUN_QUEUED, E.RUN_CANCEL_REQUESTED]
    assert first["results"][1] == {
        "id": ids[1],
        "at": first["results"][1]["at"],
        "kind": E.RUN_CANCEL_REQUESTED,
        "run_id": run.pk,
        "attempt_id": None,
        "task_id": task.pk,
        "worker_id": None,
        "data": {"by": "bob"},
        "text": "cancel requested by bob",
    }
    assert [e["text"] for e in rest["results"]] == ["cancelled", "run cancelled"]
    assert rest["next"] is None
    # Catching up: what came after the last id seen.
    caught_up = api.get(f"/api/runs/{run.pk}/events?after={ids[-1]}").json()
    assert caught_up == {"results": [], "next": None}


@pytest.mark.django_db
def test_the_api_says_what_is_wrong_with_a_request_for_events(api, task):
    run = lifecycle.trigger_run(task)

    missing = api.get("/api/runs/999999/events")
    bad = api.get(f"/api/runs/{run.pk}/events?after=x")

    assert (missing.status_code, missing.json()["error"]) == (404, "no run with id 999999")
    assert bad.status_code == 400
    assert bad.json()["error"] == "after must be a positive whole number, not 'x'"
