"""Delayed runs, run parameters from the dashboard and per-task concurrency limits:
the parsing, the database state and the pages, without processes (the
end-to-end tests with real agents are in test_e2e_scheduling.py)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.test import Client
from django.utils import timezone

from tasks_app import lifecycle
from tasks_app.lifecycle import TriggerRequest
from tasks_app.models import HELD_UNTIL, Attempt, Run, Task
from tasks_app.validators import MAX_DELAY_DAYS
from workers_app.waiting import why_waiting

pytestmark = pytest.mark.django_db


def post(client: Client, url: str, payload) -> tuple[int, dict]:
    response = client.post(url, json.dumps(payload), content_type="application/json")
    return response.status_code, response.json()


def trigger(task: Task, **kwargs) -> Run:
    [result] = lifecycle.trigger_runs([TriggerRequest(task.pk, **kwargs)])
    assert not isinstance(result, Exception), result
    return result[0]


def start(run: Run) -> None:
    """Its attempt is running (as if an agent had started it)."""
    Attempt.objects.filter(run=run).update(status=Attempt.Status.RUNNING, started_at=timezone.now())
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now())


# --- delayed runs ------------------------------------------------------------------


def test_it_queues_a_delayed_run_ready_at_its_time(api, task):
    at = (timezone.now() + dt.timedelta(minutes=5)).replace(microsecond=0)
    status, body = post(api, f"/api/tasks/{task.pk}/run", {"run_at": at.isoformat()})

    assert status == 201, body
    run = Run.objects.get(pk=body["id"])
    assert run.run_at == at
    assert body["run_at"] == at.isoformat()
    attempt = run.attempts.get()
    assert attempt.status == Attempt.Status.QUEUED
    assert attempt.ready_at == at
    assert body["attempts"][0]["not_before"] == at.isoformat()
    local = timezone.localtime(at).strftime("%Y-%m-%d %H:%M:%S %Z")
    assert why_waiting(run, [attempt]) == f"Scheduled to start at {local}."


def test_it_takes_run_at_in_any_offset_and_with_parameters(api, task):
    at = (timezone.now() + dt.timedelta(hours=2)).replace(microsecond=0)
    in_tokyo = at.astimezone(dt.timezone(dt.timedelta(hours=9))).isoformat()
    status, body = post(
        api, f"/api/tasks/{task.pk}/run", {"run_at": in_tokyo, "env": {"A": "1"}, "args": ["x"]}
    )

    assert status == 201, body
    run = Run.objects.get(pk=body["id"])
    assert run.run_at == at
    assert run.params == {"env": {"A": "1"}, "args": ["x"]}


@pytest.mark.parametrize(
    "run_at, message",
    [
        ("2020-01-01T00:00:00+00:00", "is in the past"),
        ("tomorrow", "Not a time in ISO 8601: 'tomorrow'"),
        ("2030-01-01T09:00:00", "Give the time with its UTC offset"),
        (12, "Give a time in ISO 8601 with a UTC offset."),
        ("far", f"At most {MAX_DELAY_DAYS} days ahead."),
    ],
)
def test_it_refuses_a_bad_run_at_and_creates_nothing(api, task, run_at, message):
    if run_at == "far":
        run_at = (timezone.now() + dt.timedelta(days=MAX_DELAY_DAYS + 1)).isoformat()
    status, body = post(api, f"/api/tasks/{task.pk}/run", {"run_at": run_at})

    assert status == 400
    assert body["error"] == "invalid fields"
    assert list(body["errors"]) == ["run_at"]
    assert message in body["errors"]["run_at"][0]
    assert not Run.objects.exists()


def test_a_bulk_request_delays_every_run_to_its_run_at(api, task):
    at = (timezone.now() + dt.timedelta(minutes=30)).replace(microsecond=0)
    status, body = post(
        api,
        "/api/runs",
        {"task": task.pk, "runs": [{"args": ["a"]}, {"args": ["b"]}], "run_at": at.isoformat()},
    )

    assert status == 201, body
    assert [r["run_at"] for r in body["results"]] == [at.isoformat()] * 2
    assert sorted(Attempt.objects.values_list("ready_at", flat=True)) == [at, at]
    status, body = post(api, "/api/runs", {"task": task.pk, "count": 3, "run_at": at.isoformat()})
    assert status == 201, body
    assert Run.objects.filter(run_at=at).count() == 5


def test_a_bulk_request_with_a_past_run_at_starts_nothing(api, task):
    status, body = post(
        api, "/api/runs", {"task": task.pk, "count": 2, "run_at": "2020-01-01T00:00:00+00:00"}
    )

    assert status == 400
    assert list(body["errors"]) == ["run_at"]
    assert "is in the past" in body["errors"]["run_at"][0]
    assert not Run.objects.exists()


# --- the dashboard's run form ------------------------------------------------------


def test_the_task_page_runs_with_parameters_and_a_time(bob_client, task):
    at = timezone.localtime(timezone.now() + dt.timedelta(hours=1)).replace(microsecond=0)
    response = bob_client.post(
        f"/tasks/{task.pk}/run/",
        {
            "run_at": at.strftime("%Y-%m-%dT%H:%M:%S"),
            "env": "REGION=eu\r\nMODE=full",
            "args": "--since\r\ntwo words\r\n\r\n",
        },
    )

    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/runs/{run.pk}/"
    assert run.run_at == at
    assert run.params == {"env": {"REGION": "eu", "MODE": "full"}, "args": ["--since", "two words"]}
    assert run.definition["argv"][-2:] == ["--since", "two words"]
    assert run.definition["env"]["REGION"] == "eu"
    page = bob_client.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="run-params"' in page and "REGION=eu" in page
    assert 'id="run-at"' in page
    assert "Scheduled to start at" in page


def test_the_task_page_shows_run_form_errors_and_starts_nothing(bob_client, task):
    past = timezone.localtime(timezone.now() - dt.timedelta(hours=1))
    response = bob_client.post(
        f"/tasks/{task.pk}/run/",
        {"run_at": past.strftime("%Y-%m-%dT%H:%M"), "env": "1BAD=x", "args": "a\x00b"},
    )

    assert response.status_code == 400
    errors = response.context["run_form"].errors
    assert "is in the past" in errors["run_at"][0]
    assert errors["env"] == [
        "Line 1: Invalid variable name '1BAD': use letters, digits and '_', "
        "not starting with a digit."
    ]
    assert errors["args"] == ["Null characters are not allowed."]
    assert 'data-field="run_at"' in response.content.decode()
    assert not Run.objects.exists()


def test_run_now_without_options_still_starts_at_once(bob_client, task):
    response = bob_client.post(f"/tasks/{task.pk}/run/", {"next": f"/tasks/{task.pk}/"})

    run = Run.objects.get()
    assert response.status_code == 302
    assert run.run_at is None and run.params == {}
    assert run.attempts.get().not_before is None


# --- concurrency ------------------------------------------------------------------


def limited(task: Task, policy: str, limit: int = 1) -> Task:
    task.concurrency_limit, task.busy_policy = limit, policy
    task.save()
    return task


def test_it_holds_a_run_of_a_busy_task_and_releases_it_when_the_first_ends(task):
    limited(task, "queue")
    first = trigger(task)
    start(first)
    second, third = trigger(task), trigger(task)

    held = [Attempt.objects.get(run=r) for r in (second, third)]
    assert [a.ready_at for a in held] == [HELD_UNTIL, HELD_UNTIL]
    assert held[0].is_held and held[0].not_before is None
    assert (
        why_waiting(second, [held[0]])
        == f"Waiting for run #{first.pk} of this task to end (limit 1)."
    )

    # No agent here: end it as the master would, through the final-state path.
    lifecycle.lose([first.attempts.get().pk], "gone")

    released, still = (Attempt.objects.get(run=r) for r in (second, third))
    assert released.ready_at <= timezone.now()
    assert still.ready_at == HELD_UNTIL  # first in, first out: one at a time


def test_it_skips_a_run_of_a_busy_task_with_the_reason(api, task):
    limited(task, "skip")
    first = trigger(task)
    start(first)

    status, body = post(api, f"/api/tasks/{task.pk}/run", {})

    assert status == 201, body
    assert body["status"] == "skipped"
    assert body["attempts"] == []
    skipped = Run.objects.get(pk=body["id"])
    assert skipped.status == Run.Status.SKIPPED and skipped.is_final
    assert skipped.reason == f"skipped: run #{first.pk} still running (limit 1)"
    assert body["reason"] == skipped.reason
    assert not skipped.attempts.exists()


def test_it_replaces_the_running_run(task):
    limited(task, "replace")
    first = trigger(task)
    start(first)

    second = trigger(task)

    first.refresh_from_db()
    assert first.cancel_requested_by == f"replace by run #{second.pk}"
    assert second.attempts.get().ready_at <= timezone.now()


def test_two_triggers_in_one_batch_at_limit_1_with_skip_give_one_run_and_one_skip(task):
    limited(task, "skip")

    results = lifecycle.trigger_runs([TriggerRequest(task.pk), TriggerRequest(task.pk)])

    [a], [b] = results
    assert a.status == Run.Status.QUEUED
    assert b.status == Run.Status.SKIPPED
    assert b.reason == f"skipped: run #{a.pk} still queued (limit 1)"


def test_a_limit_counts_only_runs_of_that_task(task):
    limited(task, "skip")
    other = Task.objects.create(name="other", command="true")
    start(trigger(other))

    assert trigger(task).status == Run.Status.QUEUED


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("concurrency_limit", -1, "Ensure this value is greater than or equal to 0."),
        ("concurrency_limit", "one", "Expected an integer or null."),
        ("busy_policy", "later", "Choose queue, skip or replace."),
    ],
)
def test_it_refuses_a_bad_concurrency_setting(api, field, value, message):
    status, body = post(api, "/api/tasks", {"name": "t", "command": "true", field: value})

    assert status == 400
    assert body["errors"][field] == [message]
    assert not Task.objects.exists()


def test_the_task_form_sets_concurrency_and_refuses_a_bad_policy(bob_client):
    response = bob_client.post(
        "/tasks/new/",
        {"name": "t", "command": "true", "concurrency_limit": "1", "busy_policy": "skip"},
    )
    assert response.status_code == 302
    task = Task.objects.get()
    assert (task.concurrency_limit, task.busy_policy) == (1, "skip")

    response = bob_client.post(
        f"/tasks/{task.pk}/edit/",
        {"name": "t", "command": "true", "concurrency_limit": "2", "busy_policy": "later"},
    )
    assert response.status_code == 400
    assert response.context["form"].errors["busy_policy"] == [
        "Select a valid choice. later is not one of the available choices."
    ]
    task.refresh_from_db()
    assert (task.concurrency_limit, task.busy_policy) == (1, "skip")


def test_deleting_a_task_releases_its_held_runs(task):
    limited(task, "queue")
    start(trigger(task))
    held = trigger(task)
    assert held.attempts.get().is_held

    task.delete()

    attempt = held.attempts.get()
    assert not attempt.is_held
    assert attempt.ready_at <= timezone.now()


def test_the_held_notice_survives_a_deleted_task(task):
    limited(task, "queue")
    first = trigger(task)
    start(first)
    held = trigger(task)
    attempt = held.attempts.get()
    Task.objects.filter(pk=task.pk)._raw_delete(Task.objects.db)  # no signal: still held

    assert why_waiting(held, [attempt]) == (f"Waiting for run #{first.pk} of this task to end.")


def test_raising_the_limit_releases_as_many_held_runs_as_it_has_room_for(api, task):
    limited(task, "queue")
    start(trigger(task))
    held = [trigger(task) for _ in range(3)]
    assert all(r.attempts.get().is_held for r in held)

    status, body = api_patch(api, task, {"concurrency_limit": 3})

    assert status == 200, body
    assert [r.attempts.get().is_held for r in held] == [False, False, True]  # oldest first

    Task.objects.get(pk=task.pk).save()  # saving without a change releases nothing
    assert held[2].attempts.get().is_held

    status, body = api_patch(api, task, {"concurrency_limit": None})  # no limit any more

    assert status == 200, body
    assert not held[2].attempts.get().is_held


def test_lowering_the_limit_releases_nothing(api, task):
    limited(task, "queue", limit=2)
    start(trigger(task))
    start(trigger(task))
    held = trigger(task)

    api_patch(api, task, {"concurrency_limit": 1})

    assert held.attempts.get().is_held


def test_a_retry_meets_the_tasks_limit_like_any_trigger(api, task):
    limited(task, "skip")
    first = trigger(task)
    start(first)
    lifecycle.lose([first.attempts.get().pk], "gone")
    running = trigger(task)
    start(running)

    status, body = post(api, f"/api/runs/{first.pk}/retry", {})

    assert status == 201, body
    assert body["status"] == "skipped"
    assert body["reason"] == f"skipped: run #{running.pk} still running (limit 1)"
    assert Run.objects.get(pk=body["id"]).retry_of_id == first.pk


def api_patch(client: Client, task: Task, payload) -> tuple[int, dict]:
    response = client.patch(
        f"/api/tasks/{task.pk}", json.dumps(payload), content_type="application/json"
    )
    return response.status_code, response.json()
