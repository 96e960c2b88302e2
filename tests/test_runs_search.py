"""The runs list's search (task, name, status, worker, trigger, time range),
its keyset paging, and the bulk cancel and retry of selected runs: on the
dashboard and in the API, checked against a plain Python reading of the same
runs."""

from __future__ import annotations

import datetime as dt
import json
import re
from html import unescape
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.http import QueryDict
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tasks_app import bulk_runs, lifecycle
from tasks_app import history as history_module
from tasks_app.models import Attempt, AuditEntry, Run, Task
from tasks_app.signals import stop_requested

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TASKS = ("etl-daily", "etl-hourly", "Report", "cleanup")
STATUSES = ("succeeded", "failed", "cancelled", "succeeded", "skipped", "queued", "running")
TRIGGERS = ("manual", "api", "schedule", "retry", "schedule")
WORKERS = ("node-a", "node-b", "node-c")
RUNS = 36


@pytest.fixture
def history():
    """RUNS runs over 4 tasks with varied statuses, triggers, workers and times:
    every third run shares its created_at with the one before (ties), and every
    fifth has a second try on the next worker. Returns each run's facts."""
    tasks = [Task.objects.create(name=name, command="true") for name in TASKS]
    rows = []
    for i in range(RUNS):
        task = tasks[i % len(tasks)]
        run = lifecycle.trigger_run(task)
        status, trigger = STATUSES[i % len(STATUSES)], TRIGGERS[i % len(TRIGGERS)]
        # Pairs of runs created in the same instant, in the order of their ids.
        created = T0 + dt.timedelta(hours=6 * (i - (1 if i % 3 == 2 else 0)))
        Run.objects.filter(pk=run.pk).update(status=status, trigger=trigger, created_at=created)
        workers = {WORKERS[i % 3]}
        Attempt.objects.filter(run=run).update(
            worker_name=WORKERS[i % 3],
            status={"queued": "queued", "running": "running"}.get(status, "succeeded"),
        )
        if i % 5 == 0:
            Attempt.objects.create(run=run, try_number=2, worker_name=WORKERS[(i + 1) % 3])
            workers.add(WORKERS[(i + 1) % 3])
        rows.append(
            {
                "id": run.pk,
                "task": task.pk,
                "name": task.name,
                "status": status,
                "trigger": trigger,
                "workers": workers,
                "created": created,
            }
        )
    return rows


def expected(rows, **want) -> list[int]:
    """The ids the filters should answer, newest first (created, then id)."""
    found = []
    for row in rows:
        if "task" in want and row["task"] != want["task"]:
            continue
        if "name" in want and not row["name"].upper().startswith(want["name"].upper()):
            continue
        if "status" in want and row["status"] not in want["status"]:
            continue
        if "trigger" in want and row["trigger"] not in want["trigger"]:
            continue
        if "worker" in want and want["worker"] not in row["workers"]:
            continue
        if "since" in want and row["created"] < want["since"]:
            continue
        if "until" in want and row["created"] >= want["until"]:
            continue
        found.append(row)
    found.sort(key=lambda r: (r["created"], r["id"]), reverse=True)
    return [r["id"] for r in found]


def run_links(response) -> list[int]:
    """Run ids linked from a runs page, in page order."""
    return [int(pk) for pk in re.findall(r'href="/runs/(\d+)/">#', response.content.decode())]


def api_ids(api, query: str) -> list[int]:
    response = api.get(f"/api/runs?{query}&limit=200")
    assert response.status_code == 200, response.content
    assert response.json()["next"] is None
    return [run["id"] for run in response.json()["results"]]


def page_ids(client, query: str, settings) -> list[int]:
    settings.SCHEDULER_PAGE_SIZE = 200
    response = client.get(f"{reverse('tasks:runs')}?{query}")
    assert response.status_code == 200
    return run_links(response)


# What each query means, for the reference reading (times as the fixture's).
ALONE = [
    ("status=failed", {"status": {"failed"}}),
    ("status=failed&status=cancelled", {"status": {"failed", "cancelled"}}),
    ("status=queued,running", {"status": {"queued", "running"}}),
    ("trigger=retry", {"trigger": {"retry"}}),
    ("trigger=manual&trigger=api", {"trigger": {"manual", "api"}}),
    ("worker=node-b", {"worker": "node-b"}),
    ("name=etl", {"name": "etl"}),
    ("name=ETL-H", {"name": "etl-h"}),
    ("name=report", {"name": "report"}),
    ("since=2026-03-05", {"since": dt.datetime(2026, 3, 5, tzinfo=dt.UTC)}),
    ("until=2026-03-04", {"until": dt.datetime(2026, 3, 5, tzinfo=dt.UTC)}),
    (
        "since=2026-03-02T06:00:00%2B00:00",
        {"since": dt.datetime(2026, 3, 2, 6, tzinfo=dt.UTC)},
    ),
    # No offset: the server's time zone (UTC in the tests' settings).
    ("until=2026-03-03T18:00", {"until": dt.datetime(2026, 3, 3, 18, tzinfo=dt.UTC)}),
]
COMBINED = [
    ("status=succeeded&trigger=schedule", {"status": {"succeeded"}, "trigger": {"schedule"}}),
    ("name=etl&worker=node-a", {"name": "etl", "worker": "node-a"}),
    (
        "status=succeeded&status=failed&worker=node-c&since=2026-03-02&until=2026-03-08",
        {
            "status": {"succeeded", "failed"},
            "worker": "node-c",
            "since": dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
            "until": dt.datetime(2026, 3, 9, tzinfo=dt.UTC),
        },
    ),
    (
        "name=e&trigger=schedule&trigger=retry&status=succeeded&worker=node-a&since=2026-03-01",
        {
            "name": "e",
            "trigger": {"schedule", "retry"},
            "status": {"succeeded"},
            "worker": "node-a",
            "since": dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
        },
    ),
    ("status=queued&trigger=manual&name=zzz", {"status": {"queued"}, "name": "zzz"}),
]


@pytest.mark.parametrize(("query", "want"), ALONE + COMBINED)
def test_it_finds_the_runs_every_filter_and_combination_names(
    bob_client, api, history, settings, query, want
):
    reference = expected(history, **want)

    assert api_ids(api, query) == reference
    assert page_ids(bob_client, query, settings) == reference


def test_each_filter_narrows_the_fixture_so_the_comparisons_mean_something(history):
    for _, want in ALONE + COMBINED[:-1]:
        assert 0 < len(expected(history, **want)) < RUNS, want
    assert expected(history, **COMBINED[-1][1]) == []


def test_it_finds_the_runs_of_one_task_by_its_id(bob_client, api, history, settings):
    task = Task.objects.get(name="Report")

    reference = expected(history, task=task.pk)

    assert len(reference) == RUNS // 4
    assert api_ids(api, f"task={task.pk}&status=succeeded") == expected(
        history, task=task.pk, status={"succeeded"}
    )
    assert page_ids(bob_client, f"task={task.pk}", settings) == reference


def test_a_name_prefix_is_matched_literally_not_as_a_pattern(api, history):
    Task.objects.create(name="100%_done", command="true")
    lifecycle.trigger_run(Task.objects.get(name="100%_done"))

    assert api_ids(api, "name=%25") == []
    assert api_ids(api, "name=_") == []
    assert len(api_ids(api, "name=100%25_")) == 1
    assert len(api_ids(api, "name=100")) == 1


def _walk_api(api, query: str) -> tuple[list[int], list[str]]:
    ids, links = [], []
    url = f"/api/runs?{query}"
    while url:
        response = api.get(url)
        assert response.status_code == 200, response.content
        ids += [run["id"] for run in response.json()["results"]]
        url = response.json()["next"]
        if url:
            links.append(url)
    return ids, links


@pytest.mark.parametrize(
    "query",
    [
        "",
        "status=succeeded&status=failed",
        "worker=node-a&since=2026-03-02",
        "name=etl&trigger=schedule",
    ],
)
def test_api_pages_keep_the_filters_and_never_repeat_or_skip_a_run(api, history, query):
    ids, links = _walk_api(api, f"{query}&limit=2")

    want = history_module.parse_filters(QueryDict(query))
    assert ids == api_ids(api, query)
    assert len(ids) == len(set(ids))
    assert len(links) == (len(ids) - 1) // 2
    for link in links:
        kept = history_module.parse_filters(QueryDict(urlsplit(link).query))
        assert {k: v for k, v in kept.items() if k != "before"} == want


def test_pages_split_inside_runs_created_in_the_same_instant(api, history):
    """Page boundaries fall between runs of one created_at: the id breaks the tie."""
    # Three pages of one, two and the rest over a pair created in one instant.
    tied = [r for r in history if r["created"] == history[2]["created"]]
    assert len(tied) == 2
    ids, _ = _walk_api(api, "limit=1")

    assert ids == expected(history)
    assert ids.index(tied[1]["id"]) + 1 == ids.index(tied[0]["id"])


def test_dashboard_pages_keep_the_filters_in_older_and_newest_links(bob_client, history, settings):
    settings.SCHEDULER_PAGE_SIZE = 3
    query = "status=succeeded&status=failed&worker=node-a"
    seen, url, pages = [], f"{reverse('tasks:runs')}?{query}", 0
    while url:
        response = bob_client.get(url)
        assert response.status_code == 200
        seen += run_links(response)
        html = response.content.decode()
        older = re.search(r'href="([^"]+)">Older', html)
        url = unescape(older.group(1)) if older else None
        if pages:
            newest = unescape(re.search(r'href="([^"]+)">← Newest', html).group(1))
            assert parse_qs(urlsplit(newest).query) == parse_qs(query)
        if url:
            kept = parse_qs(urlsplit(url).query)
            assert {k: v for k, v in kept.items() if k != "before"} == parse_qs(query)
        pages += 1

    assert seen == expected(history, status={"succeeded", "failed"}, worker="node-a")
    assert pages == (len(seen) + 2) // 3


HOSTILE = [
    ("status=bogus", "unknown status 'bogus'"),
    ("status=failed&status=FAILED", "unknown status 'FAILED'"),
    ("trigger=cron", "unknown trigger 'cron'"),
    ("task=-1", "task must be a positive whole number"),
    ("task=%C2%B2", "task must be a positive whole number"),
    ("task=99999999999999999999", "task must be a positive whole number"),
    ("before=abc", "before must be a positive whole number"),
    ("before=987654321", "run 987654321 is no longer stored"),
    ("since=2026-13-45", "since must be a date"),
    ("since=tomorrow", "since must be a date"),
    ("until=9999-12-31", "until must be a date"),
    ("since=0001-01-01T00:00:00%2B14:00", "since must be a date"),
    ("since=2026-03-05&until=2026-03-01", "since must be earlier than until"),
    ("name=" + "x" * 201, "name must be at most 200 characters"),
    ("name=%00", "name must not contain a NUL character"),
    ("worker=a%00b", "worker must not contain a NUL character"),
]


@pytest.mark.parametrize(("query", "message"), HOSTILE)
def test_bad_filter_values_get_a_400_that_says_why_and_no_runs(
    bob_client, api, history, query, message
):
    answer = api.get(f"/api/runs?{query}")
    page = bob_client.get(f"{reverse('tasks:runs')}?{query}")
    swapped = bob_client.get(f"{reverse('tasks:runs')}?{query}", headers={"HX-Request": "true"})

    assert answer.status_code == 400 and message in answer.json()["error"]
    assert page.status_code == 400
    assert message in unescape(page.content.decode())
    assert run_links(page) == []
    # htmx swaps only a 2xx: the table's region comes with the error in it.
    assert swapped.status_code == 200 and message in unescape(swapped.content.decode())
    assert run_links(swapped) == []


def test_viewers_see_no_checkboxes_and_operators_do(client, vera, otto, history):
    client.force_login(vera)
    viewer = client.get(reverse("tasks:runs")).content.decode()
    client.force_login(otto)
    operator = client.get(reverse("tasks:runs")).content.decode()

    assert 'name="ids"' not in viewer and "Cancel selected" not in viewer
    boxes = re.findall(r'name="ids" value="(\d+)" form="run-bulk"', operator)
    assert [int(pk) for pk in boxes] == run_links_of(operator)
    assert "data-select-all" in operator and "Retry selected" in operator


def run_links_of(html: str) -> list[int]:
    return [int(pk) for pk in re.findall(r'href="/runs/(\d+)/">#', html)]


# --- bulk actions ---------------------------------------------------------------------


@pytest.fixture
def mixed(task, worker):
    """Two queued runs, one running on a worker, two finished ones."""
    queued = [lifecycle.trigger_run(task) for _ in range(2)]
    running = lifecycle.trigger_run(task)
    attempt = running.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, attempt.pk, T0.timestamp(), pid=42)
    done = []
    for status in ("succeeded", "failed"):
        run = lifecycle.trigger_run(task)
        Run.objects.filter(pk=run.pk).update(status=status)
        Attempt.objects.filter(run=run).update(status=status)
        done.append(run)
    return {"queued": queued, "running": running, "done": done}


def test_bulk_cancel_cancels_what_can_be_and_says_what_it_skipped(
    client, otto, mixed, django_capture_on_commit_callbacks
):
    client.force_login(otto)
    stops = []

    def heard(**kwargs):
        stops.extend(kwargs["attempts"])

    stop_requested.connect(heard)
    ids = [r.pk for r in mixed["queued"]] + [mixed["running"].pk] + [r.pk for r in mixed["done"]]
    back = f"{reverse('tasks:runs')}?status=queued&status=running"

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("tasks:runs-cancel-many"),
            {"ids": [*map(str, ids), "987654"], "next": back},
            follow=True,
        )

    assert response.redirect_chain[0][0] == back
    said = [str(m) for m in response.context["messages"]]
    assert said == ["Cancelled 3 runs; 2 were already finished; 1 was not found."]
    for run in mixed["queued"]:
        run.refresh_from_db()
        assert run.status == "cancelled" and run.cancel_requested_by == "otto"
        assert run.attempts.get().status == "cancelled"
    running = Run.objects.get(pk=mixed["running"].pk)
    # Still running until its agent reports the kill; the agent was told.
    assert running.status == "running" and running.cancel_requested_by == "otto"
    assert stops == [(running.attempts.get().worker_id, running.attempts.get().pk)]
    stop_requested.disconnect(heard)
    assert [Run.objects.get(pk=r.pk).status for r in mixed["done"]] == ["succeeded", "failed"]
    [entry] = AuditEntry.objects.filter(action="run.cancel_many")
    assert entry.actor == "otto"
    assert entry.changes == {
        "runs": ids[:3],
        "skipped": ids[3:],
        "not_found": [987654],
    }
    assert entry.target == "runs " + ", ".join(f"#{pk}" for pk in [*ids, 987654])


def test_bulk_retry_retries_the_finished_runs_and_skips_the_others(client, otto, mixed):
    client.force_login(otto)
    done = [r.pk for r in mixed["done"]]
    queued = mixed["queued"][0].pk

    response = client.post(
        reverse("tasks:runs-retry-many"), {"ids": [str(done[0]), str(queued), str(done[1])]}
    )

    assert response.status_code == 302 and response["Location"] == reverse("tasks:runs")
    retries = list(Run.objects.filter(retry_of__in=done).order_by("retry_of_id"))
    assert [(r.retry_of_id, r.trigger, r.status, r.created_by_id) for r in retries] == [
        (done[0], "retry", "queued", otto.pk),
        (done[1], "retry", "queued", otto.pk),
    ]
    assert all(r.attempts.get().status == "queued" for r in retries)
    assert not Run.objects.filter(retry_of=queued).exists()
    said = [str(m) for m in client.get(reverse("tasks:runs")).context["messages"]]
    new = ", ".join(f"#{r.pk}" for r in retries)
    assert said == [f"Retried 2 runs (new {new}); 1 was not finished yet."]
    [entry] = AuditEntry.objects.filter(action="run.retry_many")
    assert entry.changes == {
        "runs": done,
        "retries": [r.pk for r in retries],
        "skipped": [queued],
    }


def test_a_bulk_action_with_nothing_to_do_says_so_and_changes_nothing(client, otto, mixed):
    client.force_login(otto)
    before = list(Run.objects.order_by("pk").values("pk", "status"))

    empty = client.post(reverse("tasks:runs-cancel-many"), {}, follow=True)
    finished = client.post(
        reverse("tasks:runs-cancel-many"), {"ids": [mixed["done"][0].pk]}, follow=True
    )

    assert [str(m) for m in empty.context["messages"]] == [
        "No runs selected: check the runs to act on first."
    ]
    assert [str(m) for m in finished.context["messages"]] == [
        "Cancelled 0 runs; 1 was already finished."
    ]
    assert list(Run.objects.order_by("pk").values("pk", "status")) == before


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["1"] * 0 + [str(n) for n in range(1, 502)], "at most 500 runs at once, not 501"),
        (["abc"], "ids must be a positive whole number"),
        (["-3"], "ids must be a positive whole number"),
        (["1e3"], "ids must be a positive whole number"),
    ],
)
def test_a_bulk_action_refuses_bad_or_too_many_ids_with_400(client, otto, mixed, ids, message):
    client.force_login(otto)
    before = list(Run.objects.order_by("pk").values("pk", "status", "cancel_requested_at"))

    response = client.post(reverse("tasks:runs-cancel-many"), {"ids": ids})

    assert response.status_code == 400 and message in response.content.decode()
    assert list(Run.objects.order_by("pk").values("pk", "status", "cancel_requested_at")) == before
    assert not AuditEntry.objects.filter(action="run.cancel_many").exists()


def test_viewers_cannot_bulk_cancel_or_retry(client, vera, mixed):
    client.force_login(vera)
    ids = [r.pk for r in mixed["queued"] + mixed["done"]]
    before = list(Run.objects.order_by("pk").values())

    pages = [
        client.post(reverse(name), {"ids": ids})
        for name in ("tasks:runs-cancel-many", "tasks:runs-retry-many")
    ]

    assert [p.status_code for p in pages] == [403, 403]
    assert "needs the operator role" in pages[0].content.decode()
    assert list(Run.objects.order_by("pk").values()) == before
    assert not AuditEntry.objects.filter(action__endswith="_many").exists()


def test_api_bulk_cancel_answers_per_id_in_order(api, mixed):
    ids = [mixed["done"][0].pk, mixed["queued"][0].pk, 987654, mixed["queued"][0].pk]

    response = api.post("/api/runs/cancel", json.dumps({"ids": ids}), "application/json")

    assert response.status_code == 200
    assert response.json() == {
        "results": [
            {"id": ids[0], "result": "skipped", "reason": "already succeeded", "retry": None},
            {"id": ids[1], "result": "cancelled", "reason": "", "retry": None},
            {"id": 987654, "result": "not_found", "reason": "no run with id 987654", "retry": None},
        ]
    }
    assert Run.objects.get(pk=ids[1]).status == "cancelled"
    [entry] = AuditEntry.objects.filter(action="run.cancel_many")
    assert entry.actor == "bob (token tests)"


def test_api_bulk_retry_answers_the_new_runs(api, mixed):
    ids = [r.pk for r in mixed["done"]] + [mixed["running"].pk]

    response = api.post("/api/runs/retry", json.dumps({"ids": ids}), "application/json")

    assert response.status_code == 200
    results = response.json()["results"]
    news = {r.retry_of_id: r.pk for r in Run.objects.filter(retry_of__in=ids)}
    assert results[:2] == [
        {"id": pk, "result": "retried", "reason": "", "retry": news[pk]} for pk in ids[:2]
    ]
    assert results[2] == {
        "id": ids[2],
        "result": "skipped",
        "reason": f"run {ids[2]} is running; only a finished run can be retried",
        "retry": None,
    }


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"ids": list(range(1, 502))}, {"ids": ["Give 1 to 500 run ids."]}),
        ({"ids": []}, {"ids": ["Give 1 to 500 run ids."]}),
        ({"ids": ["1"]}, {"ids[0]": ["Expected an integer."]}),
        ({"ids": [0]}, {"ids[0]": ["Ensure this value is greater than or equal to 1."]}),
        ({"ids": [True]}, {"ids[0]": ["Expected an integer."]}),
        (
            {"ids": [2**70]},
            {"ids[0]": ["Ensure this value is less than or equal to 9223372036854775807."]},
        ),
        ({"runs": [1]}, {"ids": ["This field is required."], "runs": ["Unknown field."]}),
        ({}, {"ids": ["This field is required."]}),
    ],
)
def test_api_bulk_refuses_bad_bodies_with_400_and_does_nothing(api, mixed, body, errors):
    before = list(Run.objects.order_by("pk").values("pk", "status", "cancel_requested_at"))

    for verb in ("cancel", "retry"):
        response = api.post(f"/api/runs/{verb}", json.dumps(body), "application/json")

        assert response.status_code == 400
        assert response.json() == {"error": "invalid fields", "errors": errors}
    assert list(Run.objects.order_by("pk").values("pk", "status", "cancel_requested_at")) == before
    assert Run.objects.count() == len(before)
    assert not AuditEntry.objects.filter(action__endswith="_many").exists()


def test_a_bulk_cancel_costs_the_same_queries_for_5_runs_or_50(task):
    def cost(count: int) -> int:
        ids = [lifecycle.trigger_run(task).pk for _ in range(count)]
        with CaptureQueriesContext(connection) as queries:
            outcome = lifecycle.cancel_runs(ids, by="otto")
        assert set(outcome) == set(ids) and not any(outcome.values())
        return len(queries)

    assert cost(5) == cost(50)


def test_a_bulk_retry_costs_the_same_queries_for_5_runs_or_50(task):
    def cost(count: int) -> int:
        runs = [lifecycle.trigger_run(task) for _ in range(count)]
        Run.objects.filter(pk__in=[r.pk for r in runs]).update(status="failed")
        runs = list(Run.objects.filter(pk__in=[r.pk for r in runs]))
        with CaptureQueriesContext(connection) as queries:
            made = lifecycle.retry_runs(runs)
        assert all(isinstance(r, Run) and r.pk for r in made.values())
        return len(queries)

    assert cost(5) == cost(50)


def test_the_single_cancel_and_retry_still_refuse_what_they_refused(task):
    run = lifecycle.trigger_run(task)
    with pytest.raises(lifecycle.RunNotRetryable, match="only a finished run"):
        lifecycle.retry_run(run)
    lifecycle.cancel_run(run, by="otto")
    with pytest.raises(lifecycle.RunNotCancellable, match=f"run {run.pk} already cancelled"):
        lifecycle.cancel_run(run)
    assert lifecycle.retry_run(run).retry_of_id == run.pk


def test_the_bulk_limit_is_what_the_api_document_says():
    from tasks_app import schemas

    assert schemas.RUN_IDS.schema["properties"]["ids"]["maxItems"] == bulk_runs.MAX_RUNS == 500


def test_a_bad_filter_keeps_what_was_typed_in_the_form_to_be_fixed(bob_client, history):
    task = Task.objects.get(name="Report")
    query = f"task={task.pk}&status=failed&trigger=api&name=rep&worker=node-a&since=2026-13-45"

    html = unescape(bob_client.get(f"{reverse('tasks:runs')}?{query}").content.decode())

    assert f'<option value="{task.pk}" selected>Report</option>' in html
    assert '<input type="checkbox" name="status" value="failed" checked>' in html
    assert '<input type="checkbox" name="trigger" value="api" checked>' in html
    assert 'name="name" value="rep"' in html and 'name="worker" value="node-a"' in html
    assert 'name="since" value="2026-13-45"' in html
