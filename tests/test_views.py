"""The dashboard: task, run and worker pages, the agent download and the admin."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from html import unescape
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.apps import apps
from django.contrib import admin
from django.urls import reverse
from django.utils import dateformat, timezone
from django.utils.html import escape

from tasks_app import lifecycle
from tasks_app.models import (
    ApiToken,
    Attempt,
    AuditEntry,
    DeletedTask,
    Delivery,
    Event,
    LogChunk,
    NotifyCursor,
    Run,
    SchedulerState,
    Task,
)
from workers_app import registration, servers
from workers_app.models import EnrollmentToken, Server, StuckQueue, Worker

pytestmark = pytest.mark.django_db

AGENT_SOURCE = Path(__file__).resolve().parent.parent / "workers_app" / "agent.py"
HTMX = {"HX-Request": "true"}


def make_run(task: Task, status: str = Run.Status.QUEUED) -> Run:
    run = lifecycle.trigger_run(task)
    Run.objects.filter(pk=run.pk).update(status=status)
    run.refresh_from_db()
    return run


def run_links(response) -> list[int]:
    """Run ids linked from a runs page, in page order."""
    return [int(pk) for pk in re.findall(r'href="/runs/(\d+)/">#', response.content.decode())]


def stamp(value, fmt: str = "Y-m-d H:i:s T") -> str:
    return dateformat.format(timezone.localtime(value), fmt)


def facts(html: str) -> list[tuple[str, str]]:
    """The page's <dt>/<dd> pairs as text, in order (tags dropped, spaces collapsed)."""
    pairs = re.findall(r"<dt>(.*?)</dt>\s*<dd[^>]*>(.*?)</dd>", html, flags=re.S)
    return [
        (name, " ".join(unescape(re.sub(r"<[^>]+>", "", value)).split())) for name, value in pairs
    ]


# --- login -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/tasks/",
        "/tasks/new/",
        "/tasks/{task}/edit/",
        "/tasks/{task}/delete/",
        "/runs/",
        "/runs/{run}/",
        "/workers/",
    ],
)
def test_it_sends_anonymous_visitors_to_the_login_page(client, task, url):
    run = make_run(task)
    url = url.format(task=task.pk, run=run.pk)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={url}"


def test_it_sends_anonymous_visitors_of_the_home_page_to_the_login_page(client):
    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/"


def test_it_refuses_anonymous_posts_and_changes_nothing(client, task, worker, worker_credential):
    run = make_run(task, Run.Status.FAILED)
    urls = [
        f"/tasks/{task.pk}/run/",
        f"/tasks/{task.pk}/delete/",
        f"/tasks/{task.pk}/edit/",
        "/tasks/new/",
        f"/runs/{run.pk}/retry/",
        f"/runs/{run.pk}/cancel/",
        "/scheduler/pause/",
        "/workers/add/",
        f"/workers/{worker.pk}/revoke/",
        f"/workers/{worker.pk}/disable/",
    ]
    for url in urls:
        response = client.post(url, {"name": "evil", "command": "rm -rf /"})
        assert response.status_code == 302, url
        assert response["Location"] == f"/login/?next={url}", url

    task.refresh_from_db()
    assert (task.name, task.command) == ("answer", 'python3 -c "print(6*7)"')
    assert list(Task.objects.values_list("name", flat=True)) == ["answer"]
    assert list(Run.objects.values_list("pk", "status")) == [(run.pk, Run.Status.FAILED)]
    assert EnrollmentToken.objects.count() == 0
    assert SchedulerState.current().paused is False
    worker.refresh_from_db()
    assert worker.state == Worker.State.OFFLINE
    assert registration.authenticate(worker_credential) == worker


def test_it_logs_in_and_returns_to_the_page_asked_for(client, bob):
    page = client.get("/login/?next=/runs/")
    assert page.status_code == 200
    assert 'name="next" value="/runs/"' in page.content.decode()

    response = client.post(
        "/login/", {"username": "bob", "password": "bob-pass-123", "next": "/runs/"}
    )

    assert response.status_code == 302
    assert response["Location"] == "/runs/"
    assert client.get("/runs/").status_code == 200


def test_it_shows_an_error_for_a_wrong_password(client, bob):
    response = client.post("/login/", {"username": "bob", "password": "wrong"})

    assert response.status_code == 200
    assert "Wrong username or password." in response.content.decode()
    assert client.get("/tasks/").status_code == 302


# --- tasks -------------------------------------------------------------------------


def test_it_lists_tasks_with_their_last_run(bob_client, task):
    Task.objects.create(name="idle", command="true", labels=["gpu"], timeout=5)
    make_run(task, Run.Status.FAILED)
    last = make_run(task, Run.Status.SUCCEEDED)

    response = bob_client.get("/tasks/")

    assert response.status_code == 200
    html = response.content.decode()
    assert html.index("<strong>answer</strong>") < html.index("<strong>idle</strong>")
    assert f'<a href="/runs/{last.pk}/"><span class="badge succeeded">succeeded</span></a>' in html
    assert '<span class="label">gpu</span>' in html
    assert "5 s" in html
    assert "never" in html


def test_it_creates_a_task_from_a_plain_form_post(bob_client):
    response = bob_client.post(
        "/tasks/new/",
        {
            "name": "nightly",
            "command": "python3 report.py",
            "env": "GREETING=hello world\r\nLOG_LEVEL=debug\r\n",
            "working_dir": "/srv/app",
            "timeout": "30",
            "labels": "a, b",
        },
    )

    task = Task.objects.get(name="nightly")
    assert response.status_code == 302
    assert response["Location"] == f"/tasks/{task.pk}/"
    assert task.env == {"GREETING": "hello world", "LOG_LEVEL": "debug"}
    assert task.labels == ["a", "b"]
    assert (task.command, task.shell, task.working_dir, task.timeout) == (
        "python3 report.py",
        False,
        "/srv/app",
        30,
    )
    listing = bob_client.get("/tasks/")
    assert escape("Task 'nightly' created.") in listing.content.decode()


def test_it_shows_the_form_partial_with_errors_for_an_invalid_htmx_post(bob_client):
    response = bob_client.post(
        "/tasks/new/", {"name": "", "command": 'a "', "env": "NOPE"}, headers=HTMX
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<form id="task-form"')
    assert "<html" not in html
    assert '<p class="error field-error" data-field="name">Give the task a name.</p>' in html
    assert (
        '<p class="error field-error" data-field="command">'
        "Cannot split the command into arguments: No closing quotation.</p>"
    ) in html
    assert escape("Line 1: expected KEY=VALUE, got 'NOPE'.") in html
    assert Task.objects.count() == 0


def test_it_shows_the_whole_page_with_errors_for_an_invalid_plain_post(bob_client, task):
    response = bob_client.post("/tasks/new/", {"name": "answer", "command": "echo"})

    assert response.status_code == 400
    html = response.content.decode()
    assert "<html" in html
    assert "Task with this Name already exists." in html
    assert Task.objects.count() == 1


def test_it_tells_htmx_to_go_to_the_new_task_after_a_valid_post(bob_client):
    response = bob_client.post(
        "/tasks/new/", {"name": "hx", "command": "echo hi", "labels": "linux"}, headers=HTMX
    )

    task = Task.objects.get(name="hx")
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"/tasks/{task.pk}/"
    assert task.labels == ["linux"]


def test_it_shows_the_edit_form_with_the_current_values(bob_client):
    task = Task.objects.create(
        name="edit-me", command="echo", env={"A": "1", "B": "two"}, labels=["linux", "gpu"]
    )

    response = bob_client.get(f"/tasks/{task.pk}/edit/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "A=1\nB=two</textarea>" in html
    assert 'value="linux, gpu"' in html
    assert 'value="edit-me"' in html


def test_it_edits_a_task(bob_client, task):
    response = bob_client.post(
        f"/tasks/{task.pk}/edit/",
        {"name": "answer", "command": "echo 42", "shell": "on", "env": "X=1", "timeout": "9"},
    )

    assert response.status_code == 302
    assert response["Location"] == f"/tasks/{task.pk}/"
    task.refresh_from_db()
    assert (task.command, task.shell, task.env, task.timeout, task.labels) == (
        "echo 42",
        True,
        {"X": "1"},
        9,
        [],
    )


def test_it_keeps_a_task_unchanged_when_an_edit_is_invalid(bob_client, task):
    response = bob_client.post(
        f"/tasks/{task.pk}/edit/", {"name": "answer", "command": "echo", "timeout": "0"}
    )

    assert response.status_code == 400
    assert "Ensure this value is greater than or equal to 1." in response.content.decode()
    task.refresh_from_db()
    assert (task.command, task.timeout) == ('python3 -c "print(6*7)"', None)


def test_it_answers_404_for_editing_an_unknown_task(bob_client, task):
    assert bob_client.get(f"/tasks/{task.pk + 1}/edit/").status_code == 404
    response = bob_client.post(f"/tasks/{task.pk + 1}/edit/", {"name": "x", "command": "echo"})
    assert response.status_code == 404
    assert Task.objects.count() == 1


def test_it_asks_before_deleting_and_names_the_task_and_its_runs(bob_client, task):
    make_run(task)
    make_run(task)

    response = bob_client.get(f"/tasks/{task.pk}/delete/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "Delete task “answer”?" in html
    assert "Its 2 runs stay in the history" in html
    assert Task.objects.filter(pk=task.pk).exists()


def test_it_deletes_a_task_and_its_run_pages_still_render(bob_client, task):
    run = make_run(task, Run.Status.SUCCEEDED)

    response = bob_client.post(f"/tasks/{task.pk}/delete/")

    assert response.status_code == 302
    assert response["Location"] == "/tasks/"
    assert not Task.objects.filter(pk=task.pk).exists()
    run.refresh_from_db()
    assert (run.task_id, run.task_name) == (task.pk, "answer")
    detail = bob_client.get(f"/runs/{run.pk}/")
    assert detail.status_code == 200
    link = f'<a href="/tasks/{task.pk}/">answer</a>'
    assert f"Run #{run.pk} · {link}" in detail.content.decode()
    assert "Run again" not in detail.content.decode()
    listing = bob_client.get("/runs/").content.decode()
    assert f'{link} <span class="muted">(deleted)</span>' in listing


def test_it_answers_404_for_deleting_an_unknown_task(bob_client, task):
    assert bob_client.get(f"/tasks/{task.pk + 1}/delete/").status_code == 404
    assert bob_client.post(f"/tasks/{task.pk + 1}/delete/").status_code == 404
    assert Task.objects.count() == 1


def test_it_runs_a_task_now_and_shows_the_run(bob_client, bob, task):
    response = bob_client.post(f"/tasks/{task.pk}/run/")

    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/runs/{run.pk}/"
    assert (run.task, run.status, run.trigger, run.created_by) == (
        task,
        Run.Status.QUEUED,
        Run.Trigger.MANUAL,
        bob,
    )
    assert list(run.attempts.values_list("status", flat=True)) == [Attempt.Status.QUEUED]


def test_it_tells_htmx_to_open_the_new_run(bob_client, task):
    response = bob_client.post(f"/tasks/{task.pk}/run/", headers=HTMX)

    run = Run.objects.get()
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"/runs/{run.pk}/"


def test_it_refuses_to_run_now_with_get(bob_client, task):
    response = bob_client.get(f"/tasks/{task.pk}/run/")

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert Run.objects.count() == 0


def test_it_does_not_run_a_disabled_task_and_says_why(bob_client, task):
    Task.objects.filter(pk=task.pk).update(enabled=False)

    response = bob_client.post(f"/tasks/{task.pk}/run/", follow=True)

    assert response.redirect_chain == [("/tasks/", 302)]
    assert escape("task 'answer' is disabled") in response.content.decode()
    assert Run.objects.count() == 0


def test_it_answers_404_for_running_an_unknown_task(bob_client, task):
    assert bob_client.post(f"/tasks/{task.pk + 1}/run/").status_code == 404
    assert Run.objects.count() == 0


# --- runs --------------------------------------------------------------------------


def test_it_lists_runs_newest_first(bob_client, task):
    runs = [make_run(task) for _ in range(4)]

    response = bob_client.get("/runs/")

    assert response.status_code == 200
    assert run_links(response) == [r.pk for r in reversed(runs)]


def test_it_filters_runs_by_status_and_by_task(bob_client, task):
    other = Task.objects.create(name="other", command="true")
    ok = make_run(task, Run.Status.SUCCEEDED)
    failed = make_run(task, Run.Status.FAILED)
    other_ok = make_run(other, Run.Status.SUCCEEDED)

    assert run_links(bob_client.get("/runs/?status=succeeded")) == [other_ok.pk, ok.pk]
    assert run_links(bob_client.get(f"/runs/?task={task.pk}")) == [failed.pk, ok.pk]
    both = bob_client.get(f"/runs/?task={other.pk}&status=failed")
    assert run_links(both) == []
    assert "No runs match." in both.content.decode()
    # The chosen filters stay selected in the form.
    html = bob_client.get(f"/runs/?status=failed&task={other.pk}").content.decode()
    assert '<input type="checkbox" name="status" value="failed" checked>' in html
    assert f'<option value="{other.pk}" selected>other</option>' in html


def test_it_pages_runs_with_an_older_link(bob_client, task, settings):
    settings.SCHEDULER_PAGE_SIZE = 3
    runs = [make_run(task) for _ in range(7)]
    expected = [r.pk for r in reversed(runs)]

    first = bob_client.get("/runs/")
    assert run_links(first) == expected[:3]
    older = f'href="/runs/?before={expected[2]}">Older'
    assert older in first.content.decode()
    assert "Newest</a>" not in first.content.decode()

    second = bob_client.get(f"/runs/?before={expected[2]}")
    assert run_links(second) == expected[3:6]
    assert f'href="/runs/?before={expected[5]}">Older' in second.content.decode()
    assert 'href="/runs/?">← Newest</a>' in second.content.decode()

    last = bob_client.get(f"/runs/?before={expected[5]}")
    assert run_links(last) == expected[6:]
    assert "Older" not in last.content.decode()


def test_it_keeps_the_filters_in_the_older_link(bob_client, task, settings):
    settings.SCHEDULER_PAGE_SIZE = 2
    failed = []
    for _ in range(3):
        failed.append(make_run(task, Run.Status.FAILED))
        make_run(task, Run.Status.SUCCEEDED)
    expected = [r.pk for r in reversed(failed)]

    first = bob_client.get("/runs/?status=failed")

    assert run_links(first) == expected[:2]
    older = f"/runs/?status=failed&amp;before={expected[1]}"
    assert f'href="{older}">Older' in first.content.decode()
    second = bob_client.get(older.replace("&amp;", "&"))
    assert run_links(second) == expected[2:]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            "status=bogus",
            "Filter not applied: unknown status 'bogus'; "
            "use one of queued, running, succeeded, failed, cancelled, skipped.",
        ),
        ("task=abc", "Filter not applied: task must be a positive whole number, not 'abc'."),
        ("task=%C2%B2", "Filter not applied: task must be a positive whole number, not '²'."),
        ("before=-5", "Filter not applied: before must be a positive whole number, not '-5'."),
        (
            f"task={'9' * 25}",
            f"Filter not applied: task must be a positive whole number, not '{'9' * 25}'.",
        ),
    ],
)
def test_it_refuses_an_invalid_filter_with_a_400_that_says_why(bob_client, task, query, message):
    make_run(task)

    response = bob_client.get(f"/runs/?{query}")

    # Not the unfiltered list: a page believed filtered is one bulk cancel away
    # from cancelling the wrong runs (tests/test_runs_search.py has the rest).
    assert response.status_code == 400
    assert escape(message) in response.content.decode()
    assert run_links(response) == []


def test_it_renders_only_the_run_table_for_htmx(bob_client, task):
    run = make_run(task)

    response = bob_client.get("/runs/", headers=HTMX)

    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="run-table"')
    assert "<html" not in html
    assert 'class="filters"' not in html
    assert run_links(response) == [run.pk]


def test_only_the_newest_runs_page_is_live(bob_client, task, settings):
    settings.SCHEDULER_PAGE_SIZE = 1
    make_run(task)
    newest = make_run(task)

    html = bob_client.get("/runs/").content.decode()
    assert '<div id="run-table" data-live-src="/runs/" data-live-on="runs attempts">' in html
    older = bob_client.get(f"/runs/?before={newest.pk}").content.decode()
    assert 'id="run-table" >' in older
    assert 'data-live-src="/runs/?' not in older


def test_no_page_polls(bob_client, task, worker):
    run = make_run(task)
    for path in ["/tasks/", f"/tasks/{task.pk}/", "/runs/", f"/runs/{run.pk}/", "/workers/"]:
        for headers in ({}, HTMX):
            html = bob_client.get(path, headers=headers).content.decode()
            assert not re.search(r'hx-trigger="[^"]*every', html), (path, headers)


def test_it_shows_a_finished_run_as_it_was_run(bob_client, task, worker):
    run = lifecycle.trigger_run(task)
    Task.objects.filter(pk=task.pk).update(command="echo edited-later")
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    started = time.time()
    assert lifecycle.mark_started(worker.pk, attempt.pk, started, pid=4242)
    LogChunk.objects.create(attempt=attempt, seq=1, stream="stderr", data="careful <now>\n")
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="42\n")
    LogChunk.objects.create(attempt=attempt, seq=2, stream="stdout", data="done\n")
    result = lifecycle.Result(
        status=Attempt.Status.FAILED,
        exit_code=3,
        reason="exit code 3",
        started_at=started,
        finished_at=started + 2.5,
    )
    time.sleep(2.6)  # reported when it happened: the master holds times to its own clock
    assert lifecycle.finish(worker.pk, attempt.pk, result) is lifecycle.Outcome.STORED
    run.refresh_from_db()
    attempt.refresh_from_db()

    response = bob_client.get(f"/runs/{run.pk}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert f'Run #{run.pk} · <a href="/tasks/{task.pk}/">answer</a>' in html
    assert "edited-later" not in html
    assert 'id="run-status" data-status="failed">failed</span>' in html
    # One box, lines in the order they ended, each with its stream and number.
    assert re.search(
        r'<pre class="log output-lines" id="out-\d+" data-seq="2" [^>]*>'
        r'<span class="line" data-stream="stdout" data-n="1">42</span>'
        r'<span class="line" data-stream="stderr" data-n="2">careful &lt;now&gt;</span>'
        r'<span class="line" data-stream="stdout" data-n="3">done</span></pre>',
        html,
    )
    # Times to the second with their zone, the exact instant on hover; durations in words.
    assert facts(html) == [
        ("Status", "failed"),
        ("Command", 'python3 -c "print(6*7)"'),
        ("Trigger", "manual"),
        ("Reason", "exit code 3 (after 1 attempt)"),
        ("Created", stamp(run.created_at)),
        ("Started", stamp(attempt.started_at)),
        ("Finished", stamp(attempt.finished_at)),
        ("Duration", "2.5 s"),
        ("Worker", "node-1"),
        ("Exit", "3"),
        ("Reason", "exit code 3"),
        ("Queued", stamp(attempt.queued_at, "H:i:s")),
        ("Assigned", stamp(attempt.assigned_at, "H:i:s")),
        ("Started", stamp(attempt.started_at, "H:i:s")),
        ("Finished", stamp(attempt.finished_at, "H:i:s")),
        ("Duration", "2.5 s"),
    ]
    # The instant in UTC: machine-readable for the viewer's-zone script, readable on hover.
    started = attempt.started_at.astimezone(dt.UTC)
    iso = started.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert (
        f'<time datetime="{iso}" title="{started:%Y-%m-%d %H:%M:%S} UTC" data-local="datetime">'
        in html
    )
    assert "hx-trigger" not in html


def test_it_shows_who_triggered_a_run_and_that_it_waits_for_a_worker(bob_client, task):
    bob_client.post(f"/tasks/{task.pk}/run/")
    run = Run.objects.get()

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert ("Trigger", "manual by bob") in facts(html)
    assert ("Exit", "—") in facts(html)
    assert "No worker is registered yet: add one on the Workers page." in html
    # Empty (CSS says so), and following its end for the output to come.
    assert re.search(
        r'<pre class="log output-lines" id="out-(\d+)" data-seq="-1" data-attempt="\1"'
        r' data-next="0" data-state="" data-follow></pre>',
        html,
    )


def test_a_running_runs_page_is_a_live_region_and_renders_only_it_for_htmx(
    bob_client, task, worker
):
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, attempt.pk, None, pid=1)
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="partial output")
    LogChunk.objects.create(attempt=attempt, seq=1, stream="stdout", data=" and more")

    response = bob_client.get(f"/runs/{run.pk}/", headers=HTMX)

    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith(
        f'<div id="run-live" data-live-run="{run.pk}" data-live-src="/runs/{run.pk}/"'
        f' data-live-on="run:{run.pk}">'
    )
    assert "<html" not in html
    assert 'id="run-status" data-status="running">running</span>' in html
    assert "partial output and more" in html
    # The page's socket asks for the lines after these: seq 2 on.
    assert f'data-attempt="{attempt.pk}" data-next="2"' in html
    # The header's controls are in the live part: they follow the run.
    assert 'id="cancel-run"' in html


def test_a_live_re_render_of_a_run_leaves_out_the_output_the_page_holds(bob_client, task, worker):
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="already shown")

    html = bob_client.get(
        f"/runs/{run.pk}/", headers={**HTMX, "X-Live-Region": "1"}
    ).content.decode()

    assert "already shown" not in html
    # An empty box: the page keeps its own, or (a new try) gets lines from the first.
    assert re.search(
        rf'<pre class="log output-lines" id="out-{attempt.pk}" data-seq="-1"'
        rf' data-attempt="{attempt.pk}" data-next="0" data-state="" data-follow></pre>',
        html,
    )


def test_it_shows_the_truncation_marker(bob_client, task):
    run = make_run(task, Run.Status.SUCCEEDED)
    attempt = run.attempts.get()
    Attempt.objects.filter(pk=attempt.pk).update(truncated=True, stored_bytes=3, output_bytes=50)
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="abc")

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert re.search(
        r'<pre class="log output-lines" id="out-\d+"[^>]*>'
        r'<span class="line partial" data-stream="stdout" data-n="1">abc</span></pre>\s*</div>\s*'
        r'<p class="output-truncated" id="truncated-\d+">'
        r"\[output truncated: kept 3 of 50 bytes\]</p>",
        html,
    )


def test_it_answers_404_for_an_unknown_run(bob_client):
    assert bob_client.get("/runs/12345/").status_code == 404


# --- workers -----------------------------------------------------------------------


def test_it_lists_workers_with_state_labels_and_busy_slots(bob_client, task, worker):
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE, agent_version="0.1.0")
    for status in (Attempt.Status.RUNNING, Attempt.Status.SUCCEEDED):
        attempt = make_run(task).attempts.get()
        Attempt.objects.filter(pk=attempt.pk).update(worker=worker, status=status)
    Worker.objects.create(name="spare", capacity=4, credential_hash="s" * 64)

    response = bob_client.get("/workers/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "<td><strong>node-1</strong></td>" in html
    assert '<span class="badge online">online</span>' in html
    assert "<td>node-1.example</td>" in html
    assert '<span class="label">linux</span>' in html
    assert '<span class="slots">1 / 2</span>' in html
    assert "<td>0.1.0</td>" in html
    assert '<span class="slots">0 / 4</span>' in html
    assert '<span class="badge offline">offline</span>' in html
    assert html.index("<strong>node-1</strong>") < html.index("<strong>spare</strong>")


def test_it_mints_an_enrollment_token_whose_command_registers_an_agent(bob_client, client, bob):
    response = bob_client.post("/workers/add/", {"max_uses": "1"})

    assert response.status_code == 200
    token = EnrollmentToken.objects.get()
    assert (token.created_by, token.note) == (bob, "dashboard, by bob")
    html = response.content.decode()
    raw = re.search(r'<code id="enroll-token">([^<]+)</code>', html).group(1)
    command = re.search(r'<pre class="command" id="enroll-command">([^<]+)</pre>', html).group(1)
    assert " -o ~/.local/share/scheduler-agent/agent.py http://testserver/agent.py &amp;" in command
    # The token goes in the agent's environment, not its argv (ps shows argv).
    assert "SCHEDULER_ENROLLMENT_TOKEN=" + raw + " \\\n" in command
    assert "--token" not in command
    assert (token.max_uses, token.auto_approve) == (1, False)  # the form's defaults
    assert raw not in json.dumps(list(EnrollmentToken.objects.values()), default=str)

    registered = client.post(
        "/api/workers/register",
        json.dumps({"token": raw, "name": "fresh", "capacity": 1}),
        content_type="application/json",
    )

    assert registered.status_code == 201
    assert Worker.objects.get().name == "fresh"


def test_it_mints_a_new_token_for_each_click(bob_client):
    bob_client.post("/workers/add/")
    response = bob_client.post("/workers/add/", headers=HTMX)

    assert EnrollmentToken.objects.count() == 2
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="enrollment">')
    assert "<html" not in html
    assert 'id="enroll-token">enr_' in html


def test_it_uses_the_public_url_in_the_agent_command(bob_client, settings):
    settings.SCHEDULER_PUBLIC_URL = "https://sched.example.com/"

    html = bob_client.post("/workers/add/").content.decode()

    assert "--server https://sched.example.com \\\n" in html
    assert " https://sched.example.com/agent.py &amp;&amp;" in html


def test_it_refuses_to_add_a_worker_with_get(bob_client):
    assert bob_client.get("/workers/add/").status_code == 405
    assert EnrollmentToken.objects.count() == 0


def test_it_revokes_a_worker_and_closes_its_socket(bob_client, worker, worker_credential):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    Worker.objects.filter(pk=worker.pk).update(channel_name=channel)

    response = bob_client.post(f"/workers/{worker.pk}/revoke/")

    assert response.status_code == 302
    assert response["Location"] == "/workers/"
    worker.refresh_from_db()
    assert worker.revoked_at is not None
    assert worker.state == Worker.State.DISABLED
    assert registration.authenticate(worker_credential) is None
    assert async_to_sync(layer.receive)(channel) == {"type": "agent.close", "code": 4403}
    html = bob_client.get("/workers/").content.decode()
    assert '<span class="muted">revoked</span>' in html
    assert f"/workers/{worker.pk}/revoke/" not in html


def test_it_rerenders_the_worker_table_after_an_htmx_revoke(bob_client, worker):
    response = bob_client.post(f"/workers/{worker.pk}/revoke/", headers=HTMX)

    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="worker-table"')
    assert '<span class="badge disabled">disabled</span>' in html


def test_it_answers_404_for_revoking_an_unknown_worker(bob_client, worker, worker_credential):
    assert bob_client.post(f"/workers/{worker.pk + 1}/revoke/").status_code == 404
    assert registration.authenticate(worker_credential) == worker


# --- agent download ----------------------------------------------------------------


def test_it_serves_the_agent_source_without_login(client):
    response = client.get("/agent.py")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/x-python; charset=utf-8"
    assert response.content == AGENT_SOURCE.read_bytes()


# --- admin -------------------------------------------------------------------------


def our_models() -> list:
    return [
        model
        for label in ("tasks_app", "workers_app")
        for model in apps.get_app_config(label).get_models()
    ]


def test_the_admin_registers_every_model():
    assert {Task, Run, Attempt, LogChunk, ApiToken, Worker, EnrollmentToken} <= set(our_models())
    assert [m.__name__ for m in our_models() if not admin.site.is_registered(m)] == []


@pytest.fixture
def one_of_everything(alice, task, worker):
    run = lifecycle.trigger_run(task, user=alice)
    LogChunk.objects.create(attempt=run.attempts.get(), seq=0, stream="stdout", data="hi")
    ApiToken.objects.create(user=alice, name="admin-token", token_hash="a" * 64)
    EnrollmentToken.mint(note="for the admin", user=alice)
    SchedulerState.current()
    Task.objects.create(name="gone", command="true").delete()
    servers.register("127.0.0.1:8000")
    Delivery.objects.create(
        run_id=run.pk, task_id=task.pk, kind="failure", channel="email", target="a@b.c"
    )
    NotifyCursor.objects.create(pk=1)
    StuckQueue.objects.create(labels_key="gpu")


# Written by the system, shown read-only in the admin.
# Events: written by the lifecycle (one_of_everything's task recorded task.created).
HISTORY = {
    Run,
    Attempt,
    LogChunk,
    DeletedTask,
    Server,
    AuditEntry,
    Event,
    Delivery,
    NotifyCursor,
    StuckQueue,
}


@pytest.mark.parametrize("model", our_models(), ids=lambda model: model.__name__)
def test_the_admin_shows_every_model_to_alice(client, alice, one_of_everything, model):
    client.force_login(alice)
    meta = model._meta

    changelist = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))

    # History is shown, never edited: its pages say "view", not "change".
    verb = "view" if model in HISTORY else "change"
    assert changelist.status_code == 200
    assert f"Select {meta.verbose_name} to {verb}" in changelist.content.decode()
    obj = model.objects.first()
    assert f'href="/admin/{meta.app_label}/{meta.model_name}/{obj.pk}/change/' in (
        changelist.content.decode()
    )
    change = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]))
    assert change.status_code == 200
    assert f"{verb.title()} {meta.verbose_name}" in change.content.decode()


@pytest.mark.parametrize(
    "model", sorted(HISTORY, key=lambda m: m.__name__), ids=lambda m: m.__name__
)
def test_the_admin_never_adds_or_edits_history(client, alice, one_of_everything, model):
    client.force_login(alice)
    meta = model._meta
    obj = model.objects.first()
    before = list(model.objects.values())

    changelist = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
    add = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_add"))
    edit = client.post(
        reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]),
        {"status": "succeeded", "task_name": "forged", "name": "forged", "data": "forged"},
    )

    assert f"Add {meta.verbose_name}" not in changelist.content.decode()
    assert add.status_code == 403
    assert edit.status_code == 403
    assert list(model.objects.values()) == before


def test_the_admin_run_filter_offers_only_triggers_that_exist(client, alice, one_of_everything):
    client.force_login(alice)

    page = client.get("/admin/tasks_app/run/").content.decode()

    assert "?trigger=manual" in page and "?trigger=retry" in page
    assert "?trigger=schedule" not in page


def test_the_admin_keeps_an_operator_out_even_with_is_staff(client, otto, task):
    otto.is_staff = True
    otto.save()
    client.force_login(otto)

    response = client.get("/admin/tasks_app/task/")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/admin/tasks_app/task/"


def test_an_admin_by_group_uses_the_admin_without_is_staff(bob_client, bob, task):
    assert not bob.is_staff and not bob.is_superuser

    response = bob_client.get("/admin/tasks_app/task/")

    assert response.status_code == 200 and "answer" in response.content.decode()
