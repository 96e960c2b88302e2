"""A task's secret variables: write-only, encrypted at rest, masked in output,
never in a page, an API answer, a run's snapshot or stored output."""

from __future__ import annotations

import json
import os
import stat

import pytest

from scheduler_site.envconfig import make_private
from tasks_app import lifecycle, logs
from tasks_app.models import LogChunk, Run, Task
from workers_app import protocol

pytestmark = pytest.mark.django_db

SECRET = "s3cr3t-value-of-the-token"
OTHER = "another-hidden-value"


def post_json(client, url, payload, method="post"):
    return getattr(client, method)(url, json.dumps(payload), content_type="application/json")


@pytest.fixture
def secret_task() -> Task:
    task = Task(name="deploy", command="echo deploying", env={"GREETING": "hi"})
    task.set_secret_values({"API_TOKEN": SECRET, "DB_PASSWORD": OTHER})
    task.save()
    return task


def finished_run_printing(task: Task, worker, stdout_chunks: list[str]) -> Run:
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1)
    logs.append_logs(
        [logs.Chunk(worker.pk, attempt.pk, n, "stdout", c) for n, c in enumerate(stdout_chunks)]
    )
    from tests.test_lifecycle import result

    assert lifecycle.finish(worker.pk, attempt.pk, result(0)) is lifecycle.Outcome.STORED
    return run


# --- API -------------------------------------------------------------------------


def test_it_takes_secret_env_and_answers_only_its_names(api):
    created = post_json(
        api,
        "/api/tasks",
        {"name": "deploy", "command": "true", "secret_env": {"API_TOKEN": SECRET}},
    )

    assert created.status_code == 201, created.content
    body = created.json()
    assert body["secret_env_keys"] == ["API_TOKEN"]
    assert "secret_env" not in body
    task = Task.objects.get(pk=body["id"])
    assert task.secret_values() == {"API_TOKEN": SECRET}
    # Encrypted at rest: the row does not hold the value.
    assert SECRET not in task.secret_env
    for url in ("/api/tasks", f"/api/tasks/{task.pk}"):
        answer = api.get(url)
        assert answer.status_code == 200
        assert SECRET not in answer.content.decode()
        assert "API_TOKEN" in answer.content.decode()


def test_it_keeps_changes_adds_and_removes_secrets_on_patch(api, secret_task):
    changed = post_json(
        api,
        f"/api/tasks/{secret_task.pk}",
        {"secret_env": {"API_TOKEN": None, "NEW_ONE": "fresh-value"}},
        method="patch",
    )

    assert changed.status_code == 200, changed.content
    assert changed.json()["secret_env_keys"] == ["API_TOKEN", "NEW_ONE"]
    secret_task.refresh_from_db()
    assert secret_task.secret_values() == {"API_TOKEN": SECRET, "NEW_ONE": "fresh-value"}


def test_a_patch_without_secret_env_keeps_every_secret(api, secret_task):
    changed = post_json(api, f"/api/tasks/{secret_task.pk}", {"timeout": 5}, method="put")

    assert changed.status_code == 200, changed.content
    secret_task.refresh_from_db()
    assert secret_task.secret_values() == {"API_TOKEN": SECRET, "DB_PASSWORD": OTHER}


def test_it_refuses_a_name_both_in_env_and_secret_env(api):
    answer = post_json(
        api,
        "/api/tasks",
        {"name": "x", "command": "true", "env": {"A_B": "1"}, "secret_env": {"A_B": "2xx"}},
    )

    assert answer.status_code == 400
    assert answer.json()["errors"]["secret_env"] == [
        "A_B set both as a variable and as a secret: keep one."
    ]
    assert not Task.objects.exists()


def test_it_refuses_null_for_a_secret_the_task_does_not_have(api, secret_task):
    answer = post_json(
        api, f"/api/tasks/{secret_task.pk}", {"secret_env": {"NOPE": None}}, method="patch"
    )

    assert answer.status_code == 400
    assert answer.json()["errors"]["secret_env"] == ["No current value to keep for NOPE: give one."]


def test_run_parameters_cannot_set_a_secret_name(api, secret_task):
    answer = post_json(api, f"/api/tasks/{secret_task.pk}/run", {"env": {"API_TOKEN": "mine"}})

    assert answer.status_code == 400
    assert answer.json() == {
        "error": "Run parameters cannot set API_TOKEN: a secret variable of this task."
    }
    assert not Run.objects.exists()


# --- the run's snapshot and its agent ------------------------------------------------


def test_the_snapshot_keeps_the_token_and_only_the_assign_frame_has_the_values(secret_task):
    run = lifecycle.trigger_run(secret_task)
    run.refresh_from_db()

    assert SECRET not in json.dumps(run.definition)
    assert OTHER not in json.dumps(run.definition)
    frame = protocol.assign(1, run.pk, run.task_name, run.definition)
    assert frame["secret_env"] == {"API_TOKEN": SECRET, "DB_PASSWORD": OTHER}
    assert frame["env"] == {"GREETING": "hi"}


# --- stored output, pages and downloads ---------------------------------------------


def test_the_master_masks_secrets_in_stored_output_and_everything_that_reads_it(
    api, bob_client, secret_task, worker
):
    # The agent masks first; this is the backstop for one that did not.
    run = finished_run_printing(secret_task, worker, [f"token {SECRET}\n", f"pw={OTHER}\n"])

    stored = "".join(LogChunk.objects.order_by("seq").values_list("data", flat=True))
    assert stored == "token ***\npw=***\n"
    for url in (f"/api/runs/{run.pk}", f"/api/runs/{run.pk}/result", "/api/runs"):
        answer = api.get(url)
        assert answer.status_code == 200, url
        text = b"".join(answer.streaming_content) if answer.streaming else answer.content
        assert SECRET.encode() not in text and OTHER.encode() not in text, url
    for url in (
        f"/tasks/{secret_task.pk}/",
        f"/tasks/{secret_task.pk}/edit/",
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/result/",
    ):
        page = bob_client.get(url)
        assert page.status_code == 200, url
        text = b"".join(page.streaming_content) if page.streaming else page.content
        assert SECRET.encode() not in text and OTHER.encode() not in text, url
    detail = bob_client.get(f"/tasks/{secret_task.pk}/").content.decode()
    assert "API_TOKEN" in detail and "DB_PASSWORD" in detail


def test_the_edit_form_keeps_a_blank_secret_changes_a_typed_one_and_removes_a_ticked_one(
    bob_client, secret_task
):
    form = {
        "name": "deploy",
        "command": "echo deploying",
        "env": "GREETING=hi",
        "timezone": "UTC",
        "secret__API_TOKEN": "",
        "secret__DB_PASSWORD": "",
        "secret_remove": ["DB_PASSWORD"],
        "secret_env": "ADDED=new-secret-value",
    }

    answer = bob_client.post(f"/tasks/{secret_task.pk}/edit/", form)

    assert answer.status_code in (200, 302), answer.content.decode()[:2000]
    secret_task.refresh_from_db()
    assert secret_task.secret_values() == {"API_TOKEN": SECRET, "ADDED": "new-secret-value"}

    again = {k: v for k, v in form.items() if k not in ("secret_remove", "secret__DB_PASSWORD")}
    answer = bob_client.post(
        f"/tasks/{secret_task.pk}/edit/", {**again, "secret_env": "", "secret__API_TOKEN": "x!y"}
    )

    assert answer.status_code in (200, 302)

    secret_task.refresh_from_db()
    assert secret_task.secret_values() == {"API_TOKEN": "x!y", "ADDED": "new-secret-value"}


# --- the data dir --------------------------------------------------------------------


def test_it_makes_the_data_dir_0700_and_the_database_file_0600(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)

    make_private(data, 0o700)
    make_private(data / "db.sqlite3", 0o600)

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "db.sqlite3").stat().st_mode) == 0o600
