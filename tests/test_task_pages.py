"""The task pages: a task's own page and the searchable, sortable, paged list."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils.html import escape

from tasks_app import lifecycle, task_stats
from tasks_app.models import Attempt, Run, Task

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def finished_run(
    task: Task, status: str, seconds: float | None = 1.0, exit_code: int | None = None
) -> Run:
    """A run of `task` that ended with `status` after `seconds` (None: never started)."""
    run = lifecycle.trigger_run(task)
    started = T0 if seconds is not None else None
    finished = T0 + timedelta(seconds=seconds) if seconds is not None else T0
    Run.objects.filter(pk=run.pk).update(status=status, started_at=started, finished_at=finished)
    if exit_code is not None:
        Attempt.objects.filter(run=run).update(exit_code=exit_code, worker_name="node-7")
    run.refresh_from_db()
    return run


def task_links(html: str) -> list[str]:
    """Task names linked from the task table, in page order."""
    return re.findall(r'<a href="/tasks/\d+/"><strong>([^<]+)</strong></a>', html)


def run_links(html: str) -> list[int]:
    """Run ids linked from a task's history table, in page order."""
    html = html[html.index('<div id="task-history"') :]
    return [int(pk) for pk in re.findall(r'href="/runs/(\d+)/">#', html)]


# --- 1. a task's own page ------------------------------------------------------------


def test_it_shows_a_tasks_definition_and_what_can_be_done_with_it(bob_client):
    task = Task.objects.create(
        name="nightly",
        command="set -e\necho one\necho two",
        shell=True,
        # In the order PostgreSQL's jsonb keeps keys too (shorter first).
        env={"LEVEL": "debug", "REGION": "eu"},
        labels=["linux", "gpu"],
        timeout=90,
        max_retries=3,
        retry_backoff_s=5,
        retry_backoff_max_s=60,
    )

    response = bob_client.get(f"/tasks/{task.pk}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "<h1>nightly</h1>" in html
    assert '<pre class="command" id="task-command">set -e\necho one\necho two</pre>' in html
    assert '<span class="muted">sh -c</span>' in html
    assert "<code>LEVEL=debug</code><br><code>REGION=eu</code>" in html
    assert '<span class="label">linux</span><span class="label">gpu</span>' in html
    assert "<dt>Timeout</dt><dd>90 s</dd>" in html
    assert "<dt>Retries</dt><dd>3, after 5.0 s doubling up to 1 min 0 s</dd>" in html
    assert f'action="/tasks/{task.pk}/run/"' in html
    assert f'href="/tasks/{task.pk}/edit/"' in html
    assert f'href="/tasks/{task.pk}/delete/"' in html
    assert "No finished runs yet." in html
    assert "Never run yet." in html


def test_it_pages_a_tasks_history_newest_first_and_only_its_own_runs(bob_client, task, settings):
    settings.SCHEDULER_PAGE_SIZE = 2
    other = Task.objects.create(name="other", command="true")
    mine = [lifecycle.trigger_run(task).pk for _ in range(3)]
    lifecycle.trigger_run(other)

    first = bob_client.get(f"/tasks/{task.pk}/").content.decode()
    assert run_links(first) == [mine[2], mine[1]]
    older = f"/tasks/{task.pk}/?before={mine[1]}"
    assert f'href="{older}"' in first

    second = bob_client.get(older).content.decode()
    assert run_links(second) == [mine[0]]
    assert f'href="/tasks/{task.pk}/" hx-get="/tasks/{task.pk}/">← Newest' in second
    assert "Older →" not in second


def test_it_renders_only_the_history_for_htmx(bob_client, task):
    run = lifecycle.trigger_run(task)

    html = bob_client.get(f"/tasks/{task.pk}/", headers=HTMX).content.decode()

    # The newest page is a live region: the task's events re-render it.
    assert html.lstrip().startswith(
        f'<div id="task-history" data-live-src="/tasks/{task.pk}/" data-live-on="task:{task.pk}">'
    )
    assert "<html" not in html
    assert run_links(html) == [run.pk]


def test_it_ignores_an_invalid_page_mark_with_a_message(bob_client, task):
    run = lifecycle.trigger_run(task)

    html = bob_client.get(f"/tasks/{task.pk}/?before=abc").content.decode()

    assert escape("Ignored: before must be a positive whole number, not 'abc'.") in html
    assert run_links(html) == [run.pk]


def test_it_computes_success_rate_and_duration_percentiles_of_finished_runs(bob_client, task):
    for seconds in range(1, 21):  # 1 s .. 20 s: 15 succeeded, 5 failed
        status = Run.Status.FAILED if seconds % 4 == 0 else Run.Status.SUCCEEDED
        finished_run(task, status, seconds)
    finished_run(task, Run.Status.CANCELLED, 500)  # someone stopped it: not counted
    lifecycle.trigger_run(task)  # still queued: not finished

    html = bob_client.get(f"/tasks/{task.pk}/").content.decode()

    assert "<h2>Its finished runs</h2>" in html  # fewer than the window of 100
    assert '75% <span class="muted">(15 of 20 succeeded)</span>' in html
    # Nearest rank of 20 durations: p50 the 10th (10 s), p95 the 19th (19 s).
    assert '<dd id="durations">p50 10.0 s · p95 19.0 s</dd>' in html
    assert "cancelled runs are left out" in html


def test_it_counts_only_the_last_n_finished_runs_and_finds_older_results(
    bob_client, task, monkeypatch
):
    monkeypatch.setattr(task_stats, "WINDOW", 5)
    old_failure = finished_run(task, Run.Status.FAILED, 30)
    for _ in range(5):
        newest_success = finished_run(task, Run.Status.SUCCEEDED, 2)

    html = bob_client.get(f"/tasks/{task.pk}/").content.decode()

    assert "<h2>Last 5 finished runs</h2>" in html
    assert '100% <span class="muted">(5 of 5 succeeded)</span>' in html
    assert "p95 2.0 s" in html
    assert (
        f'<dd id="last-success"><a href="/runs/{newest_success.pk}/">#{newest_success.pk}</a>'
        in html
    )
    assert f'<dd id="last-failure"><a href="/runs/{old_failure.pk}/">#{old_failure.pk}</a>' in html
    assert "2026-03-01 12:00:30 UTC</time>" in html


def test_it_reads_the_stats_in_the_same_number_of_queries_for_any_number_of_runs(bob_client, task):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert bob_client.get(f"/tasks/{task.pk}/").status_code == 200
        return len(captured)

    finished_run(task, Run.Status.SUCCEEDED)
    finished_run(task, Run.Status.FAILED)
    few = queries()
    for i in range(40):
        finished_run(task, Run.Status.FAILED if i % 3 else Run.Status.SUCCEEDED, i + 1)

    assert queries() == few


def test_it_says_when_a_task_was_deleted_and_keeps_its_history_readable(bob_client, task):
    run = finished_run(task, Run.Status.SUCCEEDED, 3)
    bob_client.post(f"/tasks/{task.pk}/delete/")

    response = bob_client.get(f"/tasks/{task.pk}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "<h1>answer</h1>" in html
    assert re.search(r"Task deleted on <time [^>]+>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time>", html)
    assert run_links(html) == [run.pk]
    assert '<span class="badge succeeded">succeeded</span>' in html
    assert "(1 of 1 succeeded)" in html
    assert f"/tasks/{task.pk}/run/" not in html
    assert f"/tasks/{task.pk}/edit/" not in html


def test_it_answers_404_for_a_task_that_never_existed(bob_client, task):
    response = bob_client.get(f"/tasks/{task.pk + 1}/")

    assert response.status_code == 404
    assert "answer" not in response.content.decode()


def test_it_links_the_task_name_from_the_task_list_the_runs_list_and_the_run_page(bob_client, task):
    run = lifecycle.trigger_run(task)
    link = f'<a href="/tasks/{task.pk}/">'

    assert f"{link}<strong>answer</strong></a>" in bob_client.get("/tasks/").content.decode()
    assert f"{link}answer</a>" in bob_client.get("/runs/").content.decode()
    assert (
        f"Run #{run.pk} · {link}answer</a></h1>"
        in bob_client.get(f"/runs/{run.pk}/").content.decode()
    )


def test_it_says_exit_codes_times_and_durations_in_words_on_the_task_page(bob_client, task):
    finished_run(task, Run.Status.FAILED, 2.5, exit_code=-15)

    html = bob_client.get(f"/tasks/{task.pk}/").content.decode()

    assert "<td>killed by SIGTERM</td>" in html
    assert "<td>2.5 s</td>" in html
    assert "<td>node-7</td>" in html
    assert re.search(
        r"<td><time datetime=[^>]+>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time></td>", html
    )


# --- 2. the task list: search, order, pages ------------------------------------------


def make_tasks(count: int, prefix: str = "task") -> list[Task]:
    return [
        Task.objects.create(
            name=f"{prefix}-{i:02d}", command=f"echo {i}", created_at=T0 + timedelta(minutes=i)
        )
        for i in range(count)
    ]


def test_it_searches_tasks_by_name_or_command_ignoring_case(bob_client):
    Task.objects.create(name="Nightly-Report", command="python3 report.py")
    Task.objects.create(name="backup", command="/usr/bin/REPORTER --all")
    Task.objects.create(name="cleanup", command="rm -rf /tmp/cache")

    html = bob_client.get("/tasks/?q=report").content.decode()

    assert task_links(html) == ["backup", "Nightly-Report"]
    assert 'name="q" value="report"' in html
    missing = bob_client.get("/tasks/?q=nothing-like-it").content.decode()
    assert task_links(missing) == []
    assert "No task matches “nothing-like-it”." in missing


def test_it_sorts_tasks_by_name_last_run_and_creation(bob_client):
    alpha, beta, gamma = (
        Task.objects.create(name=name, command="true", created_at=T0 + timedelta(days=day))
        for name, day in (("alpha", 2), ("beta", 1), ("gamma", 3))
    )
    lifecycle.trigger_run(alpha)
    lifecycle.trigger_run(beta)  # the newest run; gamma never ran

    def order(sort: str) -> list[str]:
        return task_links(bob_client.get(f"/tasks/?sort={sort}").content.decode())

    assert order("name") == ["alpha", "beta", "gamma"]
    assert order("-name") == ["gamma", "beta", "alpha"]
    assert order("-last_run") == ["beta", "alpha", "gamma"]
    assert order("last_run") == ["gamma", "alpha", "beta"]
    assert order("-created") == ["gamma", "alpha", "beta"]
    assert order("created") == ["beta", "alpha", "gamma"]
    html = bob_client.get("/tasks/?sort=-last_run").content.decode()
    assert '<option value="-last_run" selected>Last run, newest first</option>' in html


def test_it_ignores_an_unknown_order_with_a_message(bob_client):
    make_tasks(2)

    html = bob_client.get("/tasks/?sort=password").content.decode()

    assert escape("Unknown order 'password' ignored; sorted by name.") in html
    assert task_links(html) == ["task-00", "task-01"]


def test_it_pages_the_task_list_by_25_and_keeps_search_and_order_in_the_links(bob_client):
    make_tasks(49)
    make_tasks(3, prefix="other")

    first = bob_client.get("/tasks/?q=TASK&sort=-name").content.decode()
    assert task_links(first) == [f"task-{i:02d}" for i in range(48, 23, -1)]
    assert "1–25 of 49 tasks" in first
    next_url = "/tasks/?q=TASK&amp;sort=-name&amp;page=2"
    assert f'href="{next_url}" hx-get="{next_url}">Next →' in first
    assert "← Previous" not in first

    second = bob_client.get("/tasks/?q=TASK&sort=-name&page=2").content.decode()
    assert task_links(second) == [f"task-{i:02d}" for i in range(23, -1, -1)]
    assert "26–49 of 49 tasks" in second
    assert (
        'href="/tasks/?q=TASK&amp;sort=-name" hx-get="/tasks/?q=TASK&amp;sort=-name">← Previous'
        in second
    )
    assert "Next →" not in second
    # A page past the end or not a number is the nearest real page, not an error.
    assert task_links(bob_client.get("/tasks/?page=99").content.decode())[-1] == "task-48"
    assert task_links(bob_client.get("/tasks/?page=x").content.decode())[0] == "other-00"


def test_it_renders_only_the_table_for_htmx_with_the_query_applied(bob_client):
    make_tasks(30)

    html = bob_client.get("/tasks/?q=task-1", headers=HTMX).content.decode()

    assert html.lstrip().startswith(
        '<div id="task-table" data-live-src="/tasks/?q=task-1" data-live-on="tasks runs">'
    )
    assert "<html" not in html
    assert "<form" not in html.split("<tbody>")[0]
    assert task_links(html) == [f"task-{i}" for i in range(10, 20)]


def test_it_reads_the_newest_runs_in_the_same_queries_for_a_full_page_as_for_one_task(
    bob_client,
):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            html = bob_client.get("/tasks/?sort=-last_run").content.decode()
        assert html.count('<span class="badge queued">queued</span>') == Task.objects.count()
        return len(captured)

    lifecycle.trigger_run(Task.objects.create(name="one", command="true"))
    one = queries()
    for task in make_tasks(30):
        lifecycle.trigger_run(task)
        lifecycle.trigger_run(task)
    Task.objects.filter(name__gte="task-24").delete()  # a full page of 25 with the first

    assert queries() == one
