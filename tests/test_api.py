"""The JSON API: tasks, runs, workers, and how callers authenticate to it."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from tasks_app import lifecycle
from tasks_app.models import ApiToken, Attempt, DeletedTask, LogChunk, Run, Task
from workers_app import registration
from workers_app.models import EnrollmentToken, Worker

pytestmark = pytest.mark.django_db


def _time(value):
    return value.isoformat() if value else None


def post_json(client: Client, url: str, payload) -> object:
    return client.post(url, json.dumps(payload), content_type="application/json")


def task_body(task: Task, *, next_runs: list | None = None) -> dict:
    """The task as the API shows it; one task's own page adds its next_runs."""
    task.refresh_from_db()
    body = {
        "id": task.pk,
        "name": task.name,
        "command": task.command,
        "shell": task.shell,
        "env": task.env,
        "working_dir": task.working_dir,
        "timeout": task.timeout,
        "labels": task.labels,
        "max_retries": task.max_retries,
        "retry_backoff_s": task.retry_backoff_s,
        "retry_backoff_max_s": task.retry_backoff_max_s,
        "concurrency_limit": task.concurrency_limit,
        "busy_policy": task.busy_policy,
        "priority": task.priority,
        "strategy": task.strategy,
        "pinned_worker": task.pinned_worker,
        "enabled": task.enabled,
        "schedule": task.schedule,
        "timezone": task.timezone,
        "misfire_policy": task.misfire_policy,
        "schedule_paused": task.schedule_paused,
        "shards": task.shards,
        "merge_command": task.merge_command,
        "secret_env_keys": task.secret_env_keys,
        "secret_env_unreadable": task.secrets_unreadable(),
        "webhooks": task.webhooks_shown(),
        "notify_emails": task.notify_emails,
        "created_at": _time(task.created_at),
        "updated_at": _time(task.updated_at),
    }
    if next_runs is not None:
        body["next_runs"] = next_runs
    return body


def attempt_body(attempt: Attempt) -> dict:
    attempt.refresh_from_db()
    return {
        "id": attempt.pk,
        "shard_index": attempt.shard_index,
        "try_number": attempt.try_number,
        "worker": attempt.worker_name or None,
        "status": attempt.status,
        "exit_code": attempt.exit_code,
        "reason": attempt.reason,
        "queued_at": _time(attempt.queued_at),
        "not_before": _time(attempt.not_before),
        "assigned_at": _time(attempt.assigned_at),
        "accepted_at": _time(attempt.accepted_at),
        "started_at": _time(attempt.started_at),
        "finished_at": _time(attempt.finished_at),
        "output_bytes": max(attempt.output_bytes, attempt.stored_bytes),
        "truncated": attempt.truncated,
        "superseded": False,
        "late_result": None,
    }


def run_body(run: Run, *, output: dict[int, tuple[str, str, str]] | None = None) -> dict:
    """The run as the API shows it; output maps attempt id -> (output, stdout, stderr)."""
    run.refresh_from_db()
    attempts = []
    for attempt in run.attempts.order_by("id"):
        data = attempt_body(attempt)
        if output is not None:
            combined, stdout, stderr = output.get(attempt.pk, ("", "", ""))
            data.update(output=combined, stdout=stdout, stderr=stderr)
        attempts.append(data)
    latest = [
        run.attempts.filter(shard_index=index).order_by("-try_number").first()
        for index in range(run.definition.get("shards", 1))
    ]
    body = {
        "id": run.pk,
        "task": run.task_id,
        "task_deleted": DeletedTask.objects.filter(pk=run.task_id).exists(),
        "task_name": run.task_name,
        "status": run.status,
        "reason": run.reason,
        "trigger": run.trigger,
        "retry_of": run.retry_of_id,
        "cancel_requested_at": _time(run.cancel_requested_at),
        "cancel_requested_by": run.cancel_requested_by or None,
        "command": run.definition["command"],
        "params": run.params,
        "scheduled_for": _time(run.scheduled_for),
        "run_at": _time(run.run_at),
        "created_at": _time(run.created_at),
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "shards": [
            {
                "index": a.shard_index,
                "status": a.status,
                "worker": a.worker_name or None,
                "attempts": a.try_number,
            }
            for a in latest
        ],
        "merge": None,
        "attempts": attempts,
    }
    if output is not None:
        succeeded = run.status == "succeeded"
        stdout = "".join(output.get(a.pk, ("", "", ""))[1] for a in latest)
        body.update(result=stdout if succeeded else None, result_truncated=False)
    return body


def make_run(task: Task, status: str = Run.Status.QUEUED) -> Run:
    run = lifecycle.trigger_run(task)
    Run.objects.filter(pk=run.pk).update(status=status)
    run.refresh_from_db()
    return run


# --- tasks: create -----------------------------------------------------------------


def test_it_creates_a_task_and_returns_every_field(api):
    payload = {
        "name": "nightly-report",
        "command": "python3 report.py --since yesterday",
        "shell": False,
        "env": {"GREETING": "hello", "LOG_LEVEL": "debug"},
        "working_dir": "/srv/app",
        "timeout": 600,
        "labels": ["linux", "gpu"],
    }

    response = post_json(api, "/api/tasks", payload)

    assert response.status_code == 201, response.content
    task = Task.objects.get()
    assert (task.name, task.command, task.shell) == (payload["name"], payload["command"], False)
    assert task.env == {"GREETING": "hello", "LOG_LEVEL": "debug"}
    assert (task.working_dir, task.timeout, task.labels) == ("/srv/app", 600, ["linux", "gpu"])
    assert response.json() == task_body(task)


def test_it_fills_defaults_for_a_task_with_only_name_and_command(api):
    response = post_json(api, "/api/tasks", {"name": "hello", "command": "echo hi"})

    assert response.status_code == 201
    body = response.json()
    defaults = ("shell", "env", "working_dir", "timeout", "labels", "max_retries", "enabled")
    assert {k: body[k] for k in defaults} == {
        "shell": False,
        "env": {},
        "working_dir": "",
        "timeout": None,
        "labels": [],
        "max_retries": 0,
        "enabled": True,
    }
    assert body == task_body(Task.objects.get(name="hello"))


def test_it_accepts_a_shell_line_that_shlex_cannot_split_when_shell_is_set(api):
    response = post_json(api, "/api/tasks", {"name": "sh", "command": 'echo "$X', "shell": True})

    assert response.status_code == 201
    assert Task.objects.get(name="sh").shell is True


@pytest.mark.parametrize(
    ("payload", "message", "errors"),
    [
        pytest.param(
            {"command": "echo hi"},
            "invalid fields",
            {"name": ["This field is required."]},
            id="missing-name",
        ),
        pytest.param(
            {"name": "answer", "command": "echo hi"},
            "invalid task",
            {"name": ["Task with this Name already exists."]},
            id="duplicate-name",
        ),
        pytest.param(
            {"name": "t", "command": 'a "'},
            "invalid task",
            {"command": ["Cannot split the command into arguments: No closing quotation."]},
            id="unparseable-command",
        ),
        pytest.param(
            {"name": "t", "command": "   "},
            "invalid task",
            {"command": ["Enter the command to run."]},
            id="blank-command",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "timeout": 0},
            "invalid fields",
            {"timeout": ["Ensure this value is greater than or equal to 1."]},
            id="timeout-0",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "working_dir": "relative/dir"},
            "invalid task",
            {"working_dir": ["Use an absolute path (starting with /), or leave it empty."]},
            id="relative-working-dir",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "env": {"1BAD": "x"}},
            "invalid fields",
            {
                "env": [
                    "Invalid variable name '1BAD': "
                    "use letters, digits and '_', not starting with a digit."
                ]
            },
            id="env-bad-key",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "env": {"PORT": 8080}},
            "invalid fields",
            {"env.PORT": ["Expected a string."]},
            id="env-non-string-value",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "env": ["A=1"]},
            "invalid fields",
            {"env": ["Expected an object."]},
            id="env-not-an-object",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "labels": "linux,gpu"},
            "invalid fields",
            {"labels": ["Expected a list."]},
            id="labels-not-a-list",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "labels": ["linux", "has space"]},
            "invalid fields",
            {
                "labels[1]": [
                    "Invalid label 'has space': use 1-64 letters, digits, '.', '_' or '-'."
                ]
            },
            id="bad-label",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "labels": ["linux", 7]},
            "invalid fields",
            {"labels[1]": ["Expected a string."]},
            id="label-not-a-string",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "retries": 3, "owner": "bob"},
            "invalid fields",
            {"owner": ["Unknown field."], "retries": ["Unknown field."]},
            id="unknown-fields",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "shell": "yes"},
            "invalid fields",
            {"shell": ["Expected true or false."]},
            id="shell-as-string",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "timeout": "10"},
            "invalid fields",
            {"timeout": ["Expected an integer or null."]},
            id="timeout-as-string",
        ),
        pytest.param(
            {"name": "t", "command": "echo", "timeout": True},
            "invalid fields",
            {"timeout": ["Expected an integer or null."]},
            id="timeout-as-bool",
        ),
        pytest.param(
            {"name": 5, "command": ["echo", "hi"]},
            "invalid fields",
            {"command": ["Expected a string."], "name": ["Expected a string."]},
            id="name-and-command-wrong-types",
        ),
    ],
)
def test_it_rejects_an_invalid_task_with_field_errors_and_creates_nothing(
    api, task, payload, message, errors
):
    before = list(Task.objects.values_list("pk", "name", "command"))

    response = post_json(api, "/api/tasks", payload)

    assert response.status_code == 400
    assert response.json() == {"error": message, "errors": errors}
    assert list(Task.objects.values_list("pk", "name", "command")) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"name": "t", "command": ', "request body is not valid JSON", id="not-json"),
        pytest.param(b"\xff\xfe", "request body is not valid JSON", id="not-utf8"),
        pytest.param(
            b'[{"name": "t", "command": "echo"}]',
            "request body must be a JSON object",
            id="json-list",
        ),
        pytest.param(b'"echo"', "request body must be a JSON object", id="json-string"),
    ],
)
def test_it_rejects_a_body_that_is_not_a_json_object(api, body, message):
    response = api.post("/api/tasks", body, content_type="application/json")

    assert response.status_code == 400
    assert response.json() == {"error": message, "errors": {}}
    assert Task.objects.count() == 0


def test_it_rejects_a_body_over_one_megabyte(api):
    payload = {"name": "big", "command": "echo", "env": {"BLOB": "x" * (1024 * 1024)}}

    response = post_json(api, "/api/tasks", payload)

    assert response.status_code == 413
    assert response.json() == {"error": "request body over 1048576 bytes"}
    assert Task.objects.count() == 0


# --- tasks: read, edit, delete -----------------------------------------------------


def test_it_lists_tasks_in_creation_order(api):
    second = Task.objects.create(name="b-second", command="echo 2")
    first = Task.objects.create(name="a-first", command="echo 1", labels=["linux"])

    response = api.get("/api/tasks")

    assert response.status_code == 200
    assert response.json() == {"results": [task_body(second), task_body(first)], "next": None}


def test_it_pages_through_tasks_by_following_absolute_next_links(api):
    tasks = [Task.objects.create(name=f"t{i}", command="true") for i in range(5)]

    first = api.get("/api/tasks?limit=2").json()
    assert [t["id"] for t in first["results"]] == [tasks[0].pk, tasks[1].pk]
    assert first["next"] == f"http://testserver/api/tasks?after={tasks[1].pk}&limit=2"

    seen, url, pages = [], "/api/tasks?limit=2", 0
    while url:
        response = api.get(url)
        assert response.status_code == 200
        page = response.json()
        seen += [t["id"] for t in page["results"]]
        url = page["next"]
        pages += 1

    assert seen == [t.pk for t in tasks]
    assert pages == 3


def test_it_pages_tasks_fifty_at_a_time_by_default(api):
    Task.objects.bulk_create(Task(name=f"t{i:03}", command="true") for i in range(51))

    page = api.get("/api/tasks").json()

    assert len(page["results"]) == 50
    last = Task.objects.order_by("id")[49]
    assert page["next"] == f"http://testserver/api/tasks?after={last.pk}&limit=50"
    assert [t["name"] for t in api.get(page["next"]).json()["results"]] == ["t050"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("after=abc", "after must be a positive whole number, not 'abc'"),
        ("after=0", "after must be a positive whole number, not '0'"),
        ("after=%C2%B2", "after must be a positive whole number, not '²'"),
        (f"after={'9' * 30}", f"after must be a positive whole number, not '{'9' * 30}'"),
        ("limit=0", "limit must be between 1 and 200"),
        ("limit=201", "limit must be between 1 and 200"),
        ("limit=ten", "limit must be a whole number"),
        (f"limit={'9' * 5000}", "limit must be a whole number"),
    ],
)
def test_it_rejects_bad_task_page_parameters(api, task, query, message):
    response = api.get(f"/api/tasks?{query}")

    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_next_links_use_the_host_the_request_came_to(api, task, settings):
    """Behind a proxy that passes the Host header on, links point at the proxy."""
    settings.ALLOWED_HOSTS = ["sched.example.com"]
    make_run(task)
    make_run(task)

    runs = api.get("/api/runs?limit=1", headers={"Host": "sched.example.com"}).json()
    Task.objects.create(name="second", command="true")
    tasks = api.get("/api/tasks?limit=1", headers={"Host": "sched.example.com"}).json()

    assert runs["next"].startswith("http://sched.example.com/api/runs?")
    assert tasks["next"] == f"http://sched.example.com/api/tasks?after={task.pk}&limit=1"


def test_next_links_use_the_public_url_behind_a_tls_proxy(api, task, settings):
    """A proxy that ends TLS talks plain http to us: the public URL says https."""
    settings.SCHEDULER_PUBLIC_URL = "https://sched.example.com/"
    make_run(task)
    make_run(task)

    runs = api.get("/api/runs?limit=1").json()

    assert runs["next"].startswith("https://sched.example.com/api/runs?")
    assert api.get(runs["next"].removeprefix("https://sched.example.com")).status_code == 200


def test_it_copies_a_task_from_its_own_json_with_another_name(api, task):
    original = api.get(f"/api/tasks/{task.pk}").json()

    response = post_json(api, "/api/tasks", {**original, "name": "answer-copy"})

    assert response.status_code == 201
    copy = Task.objects.get(name="answer-copy")
    assert response.json() == task_body(copy)
    assert copy.pk != task.pk
    assert (copy.command, copy.timeout, copy.labels) == (task.command, task.timeout, task.labels)


def test_it_returns_one_task(api, task):
    response = api.get(f"/api/tasks/{task.pk}")

    assert response.status_code == 200
    assert response.json() == task_body(task, next_runs=[])


def test_it_answers_404_with_a_json_error_for_an_unknown_task(api, task):
    for method in ("get", "delete", "patch"):
        response = getattr(api, method)(f"/api/tasks/{task.pk + 100}")
        assert response.status_code == 404, method
        assert response.json() == {"error": f"no task with id {task.pk + 100}"}
    response = api.post(f"/api/tasks/{task.pk + 100}/run")
    assert response.status_code == 404
    assert response.json() == {"error": f"no task with id {task.pk + 100}"}
    assert Task.objects.count() == 1


def test_it_patches_only_the_fields_sent(api, task):
    response = api.patch(
        f"/api/tasks/{task.pk}",
        json.dumps({"timeout": 30, "labels": ["gpu"]}),
        content_type="application/json",
    )

    assert response.status_code == 200, response.content
    task.refresh_from_db()
    assert (task.name, task.command, task.timeout, task.labels) == (
        "answer",
        'python3 -c "print(6*7)"',
        30,
        ["gpu"],
    )
    assert response.json() == task_body(task, next_runs=[])


def test_it_leaves_a_task_unchanged_when_a_patch_is_invalid(api, task):
    response = api.patch(
        f"/api/tasks/{task.pk}", json.dumps({"timeout": 0}), content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid fields",
        "errors": {"timeout": ["Ensure this value is greater than or equal to 1."]},
    }
    task.refresh_from_db()
    assert task.timeout is None


def test_it_deletes_a_task_and_keeps_its_runs_readable(api, task):
    run = make_run(task, Run.Status.SUCCEEDED)

    response = api.delete(f"/api/tasks/{task.pk}")

    assert response.status_code == 204
    assert response.content == b""
    assert not Task.objects.filter(pk=task.pk).exists()
    detail = api.get(f"/api/runs/{run.pk}")
    assert detail.status_code == 200
    body = detail.json()
    assert (body["task"], body["task_deleted"], body["task_name"], body["command"]) == (
        task.pk,
        True,
        "answer",
        'python3 -c "print(6*7)"',
    )
    assert body == run_body(run, output={})
    # Its history is still found by the task's id.
    listed = api.get(f"/api/runs?task={task.pk}").json()["results"]
    assert [(r["id"], r["task_deleted"]) for r in listed] == [(run.pk, True)]


def test_it_answers_404_when_deleting_an_unknown_task(api, task):
    response = api.delete(f"/api/tasks/{task.pk + 1}")

    assert response.status_code == 404
    assert response.json() == {"error": f"no task with id {task.pk + 1}"}
    assert Task.objects.filter(pk=task.pk).exists()


# --- tasks: run --------------------------------------------------------------------


def test_it_queues_a_run_with_one_attempt_and_a_snapshot(api, bob, task):
    response = api.post(f"/api/tasks/{task.pk}/run")

    assert response.status_code == 201, response.content
    run = Run.objects.get()
    assert (run.task_id, run.task_name, run.status, run.trigger, run.created_by) == (
        task.pk,
        "answer",
        Run.Status.QUEUED,
        Run.Trigger.API,
        bob,
    )
    assert run.definition == task.definition()
    assert {k: run.definition[k] for k in ("command", "shell", "argv", "env", "timeout")} == {
        "command": 'python3 -c "print(6*7)"',
        "shell": False,
        "argv": ["python3", "-c", "print(6*7)"],
        "env": {},
        "timeout": None,
    }
    attempt = run.attempts.get()
    assert (attempt.shard_index, attempt.try_number, attempt.status, attempt.worker) == (
        0,
        1,
        Attempt.Status.QUEUED,
        None,
    )
    assert response.json() == run_body(run)


def test_it_keeps_the_run_command_when_the_task_is_edited_afterwards(api, task):
    run_id = api.post(f"/api/tasks/{task.pk}/run").json()["id"]

    edited = api.patch(
        f"/api/tasks/{task.pk}",
        json.dumps({"command": "echo changed", "env": {"A": "1"}}),
        content_type="application/json",
    )

    assert edited.status_code == 200
    body = api.get(f"/api/runs/{run_id}").json()
    assert body["command"] == 'python3 -c "print(6*7)"'
    definition = Run.objects.get(pk=run_id).definition
    assert (definition["command"], definition["env"]) == ('python3 -c "print(6*7)"', {})


def test_it_refuses_to_run_a_disabled_task(api, task):
    Task.objects.filter(pk=task.pk).update(enabled=False)

    response = api.post(f"/api/tasks/{task.pk}/run")

    assert response.status_code == 409
    assert response.json() == {"error": "task 'answer' is disabled"}
    assert Run.objects.count() == 0


# --- runs --------------------------------------------------------------------------


def test_it_lists_runs_newest_first(api, task):
    runs = [make_run(task) for _ in range(3)]

    response = api.get("/api/runs")

    assert response.status_code == 200
    assert response.json() == {"results": [run_body(r) for r in reversed(runs)], "next": None}


def test_it_filters_runs_by_task_and_status(api, task):
    other = Task.objects.create(name="other", command="true")
    ok = make_run(task, Run.Status.SUCCEEDED)
    failed = make_run(task, Run.Status.FAILED)
    other_ok = make_run(other, Run.Status.SUCCEEDED)
    ok_again = make_run(task, Run.Status.SUCCEEDED)

    def ids(query: str) -> list[int]:
        response = api.get(f"/api/runs?{query}")
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids(f"task={task.pk}") == [ok_again.pk, failed.pk, ok.pk]
    assert ids("status=succeeded") == [ok_again.pk, other_ok.pk, ok.pk]
    assert ids(f"task={task.pk}&status=succeeded") == [ok_again.pk, ok.pk]
    assert ids(f"task={other.pk}&status=failed") == []
    assert ids("status=running") == []


def test_it_pages_through_runs_by_following_next_without_gaps_or_duplicates(api, task):
    runs = [make_run(task) for _ in range(7)]
    expected = [r.pk for r in reversed(runs)]

    first = api.get("/api/runs?limit=3").json()
    assert [r["id"] for r in first["results"]] == expected[:3]
    assert first["next"] == f"http://testserver/api/runs?before={expected[2]}&limit=3"

    seen, url, pages = [], "/api/runs?limit=3", 0
    while url:
        response = api.get(url)
        assert response.status_code == 200
        page = response.json()
        seen += [r["id"] for r in page["results"]]
        url = page["next"]
        pages += 1

    assert seen == expected
    assert pages == 3


def test_it_keeps_the_filters_in_the_next_link(api, task):
    other = Task.objects.create(name="other", command="true")
    wanted = []
    for _ in range(5):
        wanted.append(make_run(task, Run.Status.FAILED))
        make_run(task, Run.Status.SUCCEEDED)
        make_run(other, Run.Status.FAILED)
    expected = [r.pk for r in reversed(wanted)]

    first = api.get(f"/api/runs?task={task.pk}&status=failed&limit=2").json()
    assert first["next"] == (
        f"http://testserver/api/runs?status=failed&task={task.pk}&before={expected[1]}&limit=2"
    )

    seen, url = [], first["next"]
    seen += [r["id"] for r in first["results"]]
    while url:
        page = api.get(url).json()
        seen += [r["id"] for r in page["results"]]
        url = page["next"]
    assert seen == expected


def test_it_has_no_next_link_when_the_last_page_is_exactly_full(api, task):
    runs = [make_run(task) for _ in range(4)]

    first = api.get("/api/runs?limit=2").json()
    second = api.get(first["next"]).json()

    assert [r["id"] for r in second["results"]] == [runs[1].pk, runs[0].pk]
    assert second["next"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            "status=bogus",
            "unknown status 'bogus'; use one of queued, running, succeeded, failed, cancelled,"
            " skipped",
        ),
        ("task=abc", "task must be a positive whole number, not 'abc'"),
        ("task=-1", "task must be a positive whole number, not '-1'"),
        ("task=0", "task must be a positive whole number, not '0'"),
        ("task=%C2%B2", "task must be a positive whole number, not '²'"),
        ("before=1e3", "before must be a positive whole number, not '1e3'"),
        (f"before={'9' * 30}", f"before must be a positive whole number, not '{'9' * 30}'"),
        ("limit=0", "limit must be between 1 and 200"),
        ("limit=500", "limit must be between 1 and 200"),
        ("limit=ten", "limit must be a whole number"),
    ],
)
def test_it_rejects_bad_run_filters(api, task, query, message):
    make_run(task)

    response = api.get(f"/api/runs?{query}")

    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_it_returns_one_run_with_its_output_in_sequence_order(api, task, worker):
    run = make_run(task, Run.Status.SUCCEEDED)
    attempt = run.attempts.get()
    Attempt.objects.filter(pk=attempt.pk).update(
        worker=worker,
        worker_name=worker.name,
        status=Attempt.Status.SUCCEEDED,
        exit_code=0,
        started_at=timezone.now(),
        finished_at=timezone.now(),
        output_bytes=14,
        stored_bytes=14,
    )
    # Inserted out of order: the API must order by seq, not by row id.
    LogChunk.objects.create(attempt=attempt, seq=2, stream="stdout", data="b\n")
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="a\n")
    LogChunk.objects.create(attempt=attempt, seq=1, stream="stderr", data="warning\n")

    response = api.get(f"/api/runs/{run.pk}")

    assert response.status_code == 200
    body = response.json()
    [got] = body["attempts"]
    assert (got["output"], got["stdout"], got["stderr"]) == (
        "a\nwarning\nb\n",
        "a\nb\n",
        "warning\n",
    )
    assert (got["worker"], got["exit_code"], got["truncated"]) == ("node-1", 0, False)
    assert body == run_body(run, output={attempt.pk: ("a\nwarning\nb\n", "a\nb\n", "warning\n")})


def test_it_marks_truncated_output(api, task):
    run = make_run(task, Run.Status.SUCCEEDED)
    attempt = run.attempts.get()
    Attempt.objects.filter(pk=attempt.pk).update(truncated=True, stored_bytes=4, output_bytes=9000)
    LogChunk.objects.create(attempt=attempt, seq=0, stream="stdout", data="abcd")

    [got] = api.get(f"/api/runs/{run.pk}").json()["attempts"]

    marker = "\n[output truncated: kept 4 of 9000 bytes]\n"
    assert (got["output"], got["stdout"], got["stderr"]) == (
        "abcd" + marker,
        "abcd" + marker,
        marker,
    )
    assert (got["truncated"], got["output_bytes"]) == (True, 9000)


def test_it_leaves_output_out_of_the_run_list(api, task):
    run = make_run(task)
    LogChunk.objects.create(attempt=run.attempts.get(), seq=0, stream="stdout", data="secret-ish")

    [listed] = api.get("/api/runs").json()["results"]

    assert not {"output", "stdout", "stderr"} & set(listed["attempts"][0])


def test_it_answers_404_for_an_unknown_run(api):
    response = api.get("/api/runs/999")

    assert response.status_code == 404
    assert response.json() == {"error": "no run with id 999"}


# --- authentication ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["/api/tasks", "/api/tasks/1", "/api/runs", "/api/runs/1", "/api/workers"]
)
def test_it_asks_for_credentials_without_any(client, url):
    response = client.get(url)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json() == {
        "error": "authentication required: send Authorization: Bearer <token> or log in"
    }


def test_it_refuses_to_create_a_task_without_credentials(client):
    response = post_json(client, "/api/tasks", {"name": "t", "command": "echo"})

    assert response.status_code == 401
    assert Task.objects.count() == 0


def test_it_refuses_an_unknown_bearer_token(client, bob_token):
    response = client.get("/api/tasks", headers={"Authorization": f"Bearer {bob_token}x"})

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json() == {"error": "invalid, expired or revoked API token"}


@pytest.mark.parametrize("header", ["Basic Ym9iOmJvYi1wYXNzLTEyMw==", "Bearer", "Bearer    "])
def test_it_refuses_other_authorization_schemes(client, bob, header):
    client.force_login(bob)

    response = client.get("/api/tasks", headers={"Authorization": header})

    # A malformed header is refused even with a valid session: it was meant for the API.
    assert response.status_code == 401
    assert response.json() == {"error": "use Authorization: Bearer <token>"}


def test_it_refuses_a_revoked_token(api, bob_token):
    ApiToken.objects.update(revoked_at=timezone.now())

    response = api.get("/api/tasks")

    assert response.status_code == 401
    assert response.json() == {"error": "invalid, expired or revoked API token"}


def test_it_refuses_the_token_of_a_deactivated_user(api, bob):
    bob.is_active = False
    bob.save()

    assert api.get("/api/tasks").status_code == 401


def test_it_records_when_a_token_was_last_used(api):
    assert ApiToken.objects.get().last_used_at is None

    api.get("/api/tasks")

    assert ApiToken.objects.get().last_used_at is not None


def test_it_accepts_a_logged_in_session_for_reading(bob_client, task):
    response = bob_client.get("/api/tasks")

    assert response.status_code == 200
    assert response.json() == {"results": [task_body(task)], "next": None}


def test_it_refuses_a_session_post_without_a_csrf_token(bob, task):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(bob)

    created = post_json(browser, "/api/tasks", {"name": "t", "command": "echo"})
    ran = browser.post(f"/api/tasks/{task.pk}/run")
    deleted = browser.delete(f"/api/tasks/{task.pk}")

    for response in (created, ran, deleted):
        assert response.status_code == 403
        assert response.json() == {
            "error": "CSRF check failed; send the X-CSRFToken header with a session"
        }
    assert list(Task.objects.values_list("name", flat=True)) == ["answer"]
    assert Run.objects.count() == 0


def test_it_accepts_a_session_post_with_the_csrf_token(bob):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(bob)
    browser.get("/tasks/")  # any page sets the CSRF cookie
    csrf = browser.cookies["csrftoken"].value

    response = browser.post(
        "/api/tasks",
        json.dumps({"name": "t", "command": "echo"}),
        content_type="application/json",
        headers={"X-CSRFToken": csrf},
    )

    assert response.status_code == 201
    assert Task.objects.filter(name="t").exists()


def test_it_needs_no_csrf_token_with_a_bearer_token(api):
    # The api client enforces CSRF checks; a bearer token is not sent by browsers on their own.
    response = post_json(api, "/api/tasks", {"name": "t", "command": "echo"})

    assert response.status_code == 201


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("put", "/api/tasks", "GET, POST"),
        ("delete", "/api/tasks", "GET, POST"),
        ("post", "/api/tasks/1", "GET, PUT, PATCH, DELETE"),
        ("get", "/api/tasks/1/run", "POST"),
        ("put", "/api/runs", "GET, POST"),
        ("delete", "/api/runs/1", "GET"),
        ("post", "/api/workers", "GET"),
        ("get", "/api/workers/register", "POST"),
    ],
)
def test_it_answers_405_with_allow_for_a_wrong_method(api, method, url, allow):
    response = getattr(api, method)(url)

    assert response.status_code == 405
    assert response["Allow"] == allow
    assert response.json() == {"error": f"method {method.upper()} not allowed; use {allow}"}


# --- manage.py apitoken ------------------------------------------------------------


def test_apitoken_prints_a_token_that_authenticates_and_stores_only_its_hash(client, bob):
    out = StringIO()

    call_command("apitoken", "bob", "--name", "ci", stdout=out)

    raw = out.getvalue().strip()
    assert raw.startswith("api_")
    stored = ApiToken.objects.get()
    assert (stored.user, stored.name) == (bob, "ci")
    assert stored.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in json.dumps(list(ApiToken.objects.values()), default=str)
    response = client.get("/api/tasks", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200


def test_apitoken_mints_a_different_token_each_time(bob):
    first, second = StringIO(), StringIO()

    call_command("apitoken", "bob", stdout=first)
    call_command("apitoken", "bob", stdout=second)

    assert first.getvalue() != second.getvalue()
    assert ApiToken.objects.filter(user=bob).count() == 2


def test_apitoken_refuses_an_unknown_user(bob):
    with pytest.raises(CommandError, match="no active user named 'nobody'"):
        call_command("apitoken", "nobody", stdout=StringIO())

    assert ApiToken.objects.count() == 0


# --- workers: registration ---------------------------------------------------------


@pytest.fixture
def enrollment() -> str:
    raw, _ = EnrollmentToken.mint(note="tests")
    return raw


def register(client: Client, **payload):
    body = {"name": "node-2", "hostname": "node-2.example", "capacity": 4, "labels": ["linux"]}
    return post_json(client, "/api/workers/register", {**body, **payload})


def worker_body(worker: Worker, busy: int = 0) -> dict:
    worker.refresh_from_db()
    return {
        "id": worker.pk,
        "name": worker.name,
        "hostname": worker.hostname,
        "state": worker.state,
        "labels": worker.labels,
        "capacity": worker.capacity,
        "slots_in_use": busy,
        "last_heartbeat": _time(worker.last_heartbeat),
        "agent_version": worker.agent_version,
        "revoked": worker.revoked_at is not None,
        "requested_labels": worker.requested_labels,
        "requested_capacity": worker.requested_capacity,
        "approved_at": _time(worker.approved_at),
    }


def test_it_registers_a_worker_and_stores_its_credential_hashed(client, enrollment):
    response = register(client, token=enrollment, labels=["linux", "gpu", "linux"])

    assert response.status_code == 201, response.content
    worker = Worker.objects.get()
    credential = response.json()["credential"]
    assert response.json() == {"worker": worker_body(worker), "credential": credential}
    # Pending: what it asked for is a request until an admin approves it.
    assert (
        worker.name,
        worker.hostname,
        worker.requested_capacity,
        worker.requested_labels,
        worker.state,
    ) == ("node-2", "node-2.example", 4, ["linux", "gpu"], Worker.State.PENDING)
    assert credential.startswith("wkr_")
    assert registration.authenticate(credential) == worker
    assert worker.credential_hash == hashlib.sha256(credential.encode()).hexdigest()
    assert credential not in json.dumps(list(Worker.objects.values()), default=str)
    assert EnrollmentToken.objects.get().uses == 1


def test_it_lets_one_enrollment_token_register_several_workers(client, enrollment):
    first = register(client, token=enrollment, name="a")
    second = register(client, token=enrollment, name="b")

    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["credential"] != second.json()["credential"]
    assert EnrollmentToken.objects.get().uses == 2


@pytest.mark.parametrize("how", ["expired", "revoked", "unknown"])
def test_it_refuses_an_unusable_enrollment_token(client, enrollment, how):
    if how == "expired":
        EnrollmentToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    elif how == "revoked":
        EnrollmentToken.objects.update(revoked_at=timezone.now())
    token = "enr_unknown" if how == "unknown" else enrollment

    response = register(client, token=token)

    assert response.status_code == 403
    assert response.json() == {"error": "enrollment token is unknown, expired, used up or revoked"}
    assert Worker.objects.count() == 0
    assert EnrollmentToken.objects.get().uses == 0


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        pytest.param(
            {"name": "bad name!"},
            {"name": ["Use 1-200 letters, digits, '.', '_', '@' or '-'."]},
            id="bad-name",
        ),
        pytest.param({"name": ""}, {"name": ["This field is required."]}, id="empty-name"),
        pytest.param(
            {"capacity": 0},
            {"capacity": ["Ensure this value is greater than or equal to 1."]},
            id="capacity-0",
        ),
        pytest.param(
            {"capacity": 5000},
            {"capacity": ["Ensure this value is less than or equal to 1024."]},
            id="capacity-too-big",
        ),
        pytest.param(
            {"capacity": "4"}, {"capacity": ["Expected an integer."]}, id="capacity-string"
        ),
        pytest.param(
            {"capacity": True}, {"capacity": ["Expected an integer."]}, id="capacity-bool"
        ),
        pytest.param(
            {"labels": "a b"}, {"labels": ["Expected a list of strings."]}, id="labels-string"
        ),
        pytest.param(
            {"labels": ["a b"]},
            {"labels[0]": ["Invalid label 'a b': use 1-64 letters, digits, '.', '_' or '-'."]},
            id="bad-label",
        ),
        pytest.param({"name": 7}, {"name": ["Expected a string."]}, id="name-not-a-string"),
    ],
)
def test_it_rejects_an_invalid_registration(client, enrollment, payload, errors):
    response = register(client, token=enrollment, **payload)

    assert response.status_code == 400
    assert response.json() == {"error": "invalid fields", "errors": errors}
    assert Worker.objects.count() == 0
    assert EnrollmentToken.objects.get().uses == 0


def test_it_rejects_a_registration_without_a_token(client):
    response = register(client)

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid fields",
        "errors": {"token": ["This field is required."]},
    }
    assert Worker.objects.count() == 0


def test_it_rotates_the_credential_when_an_offline_worker_enrolls_again(
    client, enrollment, worker, worker_credential
):
    assert registration.authenticate(worker_credential) == worker
    registration.allow_reenroll(worker)  # an admin's consent

    response = register(client, token=enrollment, name="node-1", hostname="new-host", capacity=8)

    assert response.status_code == 201
    new_credential = response.json()["credential"]
    assert new_credential != worker_credential
    assert registration.authenticate(worker_credential) is None
    assert registration.authenticate(new_credential) == worker
    worker.refresh_from_db()
    # The capacity decided for it stays; 8 is what its agent now asks for.
    assert (worker.hostname, worker.capacity, worker.requested_capacity) == ("new-host", 2, 8)
    assert Worker.objects.count() == 1
    assert response.json()["worker"]["id"] == worker.pk


def test_it_refuses_to_enroll_a_name_that_is_online(client, enrollment, worker, worker_credential):
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE)
    before = Worker.objects.values().get(pk=worker.pk)

    response = register(client, token=enrollment, name="node-1")

    assert response.status_code == 403
    assert response.json() == {
        "error": "a worker named 'node-1' is connected; choose another --name"
    }
    assert Worker.objects.values().get(pk=worker.pk) == before
    assert registration.authenticate(worker_credential) == worker


def test_enrollment_token_command_prints_a_usable_token(client):
    out = StringIO()

    call_command("enrollment-token", "--note", "from the test", stdout=out)

    raw = out.getvalue().strip()
    token = EnrollmentToken.objects.get()
    assert token.note == "from the test"
    assert token.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert register(client, token=raw).status_code == 201


def test_enrollment_token_command_refuses_a_non_positive_ttl():
    with pytest.raises(CommandError, match="--ttl-hours must be positive"):
        call_command("enrollment-token", "--ttl-hours", "0", stdout=StringIO())

    assert EnrollmentToken.objects.count() == 0


# --- workers: listing --------------------------------------------------------------


def test_it_lists_workers_with_their_slots_in_use(api, task, worker):
    idle = Worker.objects.create(
        name="node-0", hostname="h0", capacity=4, labels=[], credential_hash="x" * 64
    )
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE)
    statuses = [
        Attempt.Status.ASSIGNED,
        Attempt.Status.RUNNING,
        Attempt.Status.SUCCEEDED,
        Attempt.Status.LOST,
    ]
    for status in statuses:
        attempt = make_run(task).attempts.get()
        Attempt.objects.filter(pk=attempt.pk).update(worker=worker, status=status)
    make_run(task)  # queued, on no worker

    response = api.get("/api/workers")

    assert response.status_code == 200
    body = response.json()
    assert body == {"results": [worker_body(idle, busy=0), worker_body(worker, busy=2)]}
    assert [(w["name"], w["state"], w["labels"], w["capacity"]) for w in body["results"]] == [
        ("node-0", "offline", [], 4),
        ("node-1", "online", ["linux"], 2),
    ]


def test_it_refuses_to_re_enroll_a_revoked_worker(client, worker):
    from workers_app import registration as reg

    reg.revoke(worker)
    raw, _ = EnrollmentToken.mint()
    body = {"token": raw, "name": worker.name, "hostname": "h", "capacity": 1, "labels": []}

    response = client.post("/api/workers/register", body, content_type="application/json")

    assert response.status_code == 403
    assert response.json() == {
        "error": "worker 'node-1' was revoked; an operator must delete it before the name is reused"
    }
    worker.refresh_from_db()
    assert worker.revoked_at is not None


def test_it_refuses_to_enroll_over_a_connected_worker_even_when_draining(client, worker):
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.DRAINING, channel_name="live")
    raw, _ = EnrollmentToken.mint()
    body = {"token": raw, "name": worker.name, "hostname": "h", "capacity": 1, "labels": []}

    response = client.post("/api/workers/register", body, content_type="application/json")

    assert response.status_code == 403
    assert response.json() == {
        "error": "a worker named 'node-1' is connected; choose another --name"
    }


def test_it_answers_400_to_text_that_is_not_valid_unicode(api):
    body = '{"name": "\\ud800x", "command": "true"}'
    response = api.post("/api/tasks", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "request body contains text that is not valid Unicode"
    assert Task.objects.count() == 0


def test_it_writes_a_tokens_last_use_at_most_once_a_minute(api):
    api.get("/api/tasks")
    first = ApiToken.objects.get().last_used_at

    api.get("/api/tasks")
    assert ApiToken.objects.get().last_used_at == first

    ApiToken.objects.update(last_used_at=first - timedelta(minutes=2))
    api.get("/api/tasks")
    assert ApiToken.objects.get().last_used_at > first
