"""A task's secret variables: write-only, encrypted at rest, masked in output,
never in a page, an API answer, a run's snapshot or stored output."""

from __future__ import annotations

import json
import os
import stat

import pytest

from scheduler_site.envconfig import make_private
from tasks_app import lifecycle, logs, secret_env
from tasks_app.exceptions import RunNotRetryable
from tasks_app.models import Attempt, AuditEntry, LogChunk, Run, Task
from tests.test_routing import dispatched, make_worker
from workers_app import dispatch, liveness, protocol

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


# --- SECRET_KEY changed without its fallback ----------------------------------------

ANOTHER_KEY = "a-new-django-secret-key-without-the-old-one-as-fallback"


def change_key(settings) -> None:
    settings.SECRET_KEY = ANOTHER_KEY
    settings.SECRET_KEY_FALLBACKS = []


def test_dispatch_fails_runs_whose_secrets_cannot_be_read_and_assigns_the_rest(
    settings, secret_task
):
    plain = Task.objects.create(name="plain", command="true")
    doomed = lifecycle.trigger_run(secret_task)
    delayed = lifecycle.trigger_run(secret_task)
    Attempt.objects.filter(run=delayed).update(
        ready_at=doomed.attempts.get().ready_at, queue_at=doomed.attempts.get().queue_at
    )
    other = lifecycle.trigger_run(plain)
    change_key(settings)
    node = make_worker("node", capacity=3)

    assert dispatched(node) == [("node", other.pk)]

    for run in (doomed, delayed):
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED
        assert secret_env.UNREADABLE in run.reason
        attempt = run.attempts.get()
        assert (attempt.status, attempt.worker_id) == (Attempt.Status.FAILED, None)
        assert attempt.reason == secret_env.UNREADABLE
    # No retry for them (they would fail the same way), and nothing left to do.
    assert Attempt.objects.count() == 3
    assert dispatch.dispatch() == []


def test_an_unreadable_run_at_the_head_of_the_queue_does_not_stop_dispatch(settings, secret_task):
    doomed = lifecycle.trigger_run(secret_task)
    plain = lifecycle.trigger_run(Task.objects.create(name="plain", command="true"))
    change_key(settings)
    node = make_worker("node", capacity=1)

    # The oldest fails and takes no slot; the next pass (woken after commit) goes on.
    assert dispatched(node) == []
    assert dispatched(node) == [("node", plain.pk)]
    doomed.refresh_from_db()
    assert doomed.status == Run.Status.FAILED


def test_a_sharded_run_whose_secrets_cannot_be_read_fails_whole(settings, secret_task):
    secret_task.shards = 3
    secret_task.save()
    run = lifecycle.trigger_run(secret_task)
    change_key(settings)

    assert dispatched(make_worker("node", capacity=2)) == []

    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert not run.attempts.filter(status__in=[Attempt.Status.QUEUED, *Attempt.ACTIVE]).exists()


def test_an_assignment_resent_on_reconnect_fails_if_its_secrets_became_unreadable(
    settings, secret_task
):
    node = make_worker("node", capacity=2)
    doomed = lifecycle.trigger_run(secret_task)
    plain = lifecycle.trigger_run(Task.objects.create(name="plain", command="true"))
    assert len(dispatched(node)) == 2
    change_key(settings)

    reconciled = liveness.hello(node.pk, "chan-2", {"capacity": 2, "running": []})

    assert [f["run"] for f in reconciled.resend] == [plain.pk]
    doomed.refresh_from_db()
    assert doomed.status == Run.Status.FAILED
    attempt = doomed.attempts.get()
    assert (attempt.status, attempt.closed_by_master) == (Attempt.Status.FAILED, True)


def test_a_retry_of_a_run_whose_secrets_cannot_be_read_is_refused(api, settings, secret_task):
    run = lifecycle.trigger_run(secret_task)
    change_key(settings)
    dispatched(make_worker("node"))
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED

    with pytest.raises(RunNotRetryable, match="encrypted with another SECRET_KEY"):
        lifecycle.retry_run(run)
    answer = api.post(f"/api/runs/{run.pk}/retry")
    assert answer.status_code == 409
    assert secret_env.UNREADABLE in answer.json()["error"]
    assert Run.objects.count() == 1
    trigger = post_json(api, f"/api/tasks/{secret_task.pk}/run", {})
    assert trigger.status_code == 400
    assert secret_env.UNREADABLE in trigger.json()["error"]
    assert Run.objects.count() == 1


def test_an_empty_secret_set_removes_an_unreadable_one(api, settings, secret_task):
    change_key(settings)

    answer = post_json(api, f"/api/tasks/{secret_task.pk}", {"secret_env": {}}, method="patch")

    assert answer.status_code == 200, answer.content
    assert answer.json()["secret_env_keys"] == []
    assert answer.json()["secret_env_unreadable"] is False
    secret_task.refresh_from_db()
    assert secret_task.secret_env == ""
    assert lifecycle.trigger_run(secret_task).status == Run.Status.QUEUED


def test_a_task_with_unreadable_secrets_still_shows_everywhere(
    api, bob, bob_client, admin_user, admin_client, settings, secret_task
):
    change_key(settings)
    # Sessions are signed with the key too: log in again.
    bob_client.force_login(bob)
    admin_client.force_login(admin_user)

    listing = api.get("/api/tasks")
    assert listing.status_code == 200
    answer = api.get(f"/api/tasks/{secret_task.pk}")
    assert answer.status_code == 200
    body = answer.json()
    assert body["secret_env_keys"] == ["API_TOKEN", "DB_PASSWORD"]
    assert body["secret_env_unreadable"] is True
    page = bob_client.get(f"/tasks/{secret_task.pk}/")
    assert page.status_code == 200
    assert 'id="secret-env-unreadable"' in page.content.decode()
    assert "API_TOKEN" in page.content.decode()
    edit = bob_client.get(f"/tasks/{secret_task.pk}/edit/")
    assert edit.status_code == 200
    assert "another SECRET_KEY" in edit.content.decode()
    admin = admin_client.get(f"/admin/tasks_app/task/{secret_task.pk}/change/")
    assert admin.status_code == 200


def test_a_new_secret_set_replaces_an_unreadable_one_and_runs_go_again(api, settings, secret_task):
    change_key(settings)
    url = f"/api/tasks/{secret_task.pk}"

    # Another change leaves the unreadable set as it is (not silently emptied).
    answer = post_json(api, url, {"command": "echo again"}, method="patch")
    assert answer.status_code == 200, answer.content
    assert answer.json()["secret_env_unreadable"] is True
    # A value cannot be kept: there is none to keep.
    answer = post_json(api, url, {"secret_env": {"API_TOKEN": None}}, method="patch")
    assert answer.status_code == 400
    assert "cannot be read" in answer.json()["errors"]["secret_env"][0]

    answer = post_json(api, url, {"secret_env": {"API_TOKEN": "brand-new-value"}}, method="patch")

    assert answer.status_code == 200, answer.content
    assert answer.json()["secret_env_keys"] == ["API_TOKEN"]
    assert answer.json()["secret_env_unreadable"] is False
    update = AuditEntry.objects.filter(action="task.update").latest("pk")
    assert update.changes == {"secret_env": {"changed": ["API_TOKEN"], "removed": ["DB_PASSWORD"]}}
    secret_task.refresh_from_db()
    run = lifecycle.trigger_run(secret_task)
    node = make_worker("node")
    assert dispatched(node) == [("node", run.pk)]
    [frame] = dispatch.assigned_frames([node.pk])[node.pk]
    assert frame["secret_env"] == {"API_TOKEN": "brand-new-value"}


def test_the_edit_form_asks_for_every_unreadable_secret_again(
    bob, bob_client, settings, secret_task
):
    change_key(settings)
    bob_client.force_login(bob)
    form = {"name": "deploy", "command": "echo deploying", "env": "GREETING=hi", "timezone": "UTC"}
    url = f"/tasks/{secret_task.pk}/edit/"

    # Untouched: saved, the set left as it is.
    assert bob_client.post(url, form).status_code == 302
    secret_task.refresh_from_db()
    assert secret_task.secrets_unreadable()
    # One typed, the other neither typed nor removed: refused, with the reason.
    answer = bob_client.post(url, {**form, "secret__API_TOKEN": "typed-again"})
    assert answer.status_code == 400
    assert "type it again or tick Remove" in answer.content.decode()

    answer = bob_client.post(
        url, {**form, "secret__API_TOKEN": "typed-again", "secret_remove": ["DB_PASSWORD"]}
    )

    assert answer.status_code == 302
    secret_task.refresh_from_db()
    assert secret_task.secret_values() == {"API_TOKEN": "typed-again"}
    assert secret_task.secret_env_keys == ["API_TOKEN"]


def test_the_migration_keeps_the_names_of_the_secrets_it_can_read(settings, secret_task):
    import importlib

    from django.apps import apps

    migration = importlib.import_module("tasks_app.migrations.0011_task_secret_env_keys")
    lost = Task(name="lost", command="true")
    lost.set_secret_values({"GONE": "under-the-old-key"})
    lost.save()
    Task.objects.update(secret_env_keys=[])
    Task.objects.filter(pk=lost.pk).update(secret_env="not-a-token-of-this-key")

    migration.names_from_tokens(apps, None)

    secret_task.refresh_from_db()
    lost.refresh_from_db()
    assert secret_task.secret_env_keys == ["API_TOKEN", "DB_PASSWORD"]
    assert lost.secret_env_keys == []


# --- the data dir --------------------------------------------------------------------


def test_it_makes_the_data_dir_0700_and_the_database_file_0600(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)

    make_private(data, 0o700)
    make_private(data / "db.sqlite3", 0o600)

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "db.sqlite3").stat().st_mode) == 0o600
