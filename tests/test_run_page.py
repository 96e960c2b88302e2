"""The run page says what a run is waiting for, and who ended it."""

from __future__ import annotations

import re
from html import unescape

import pytest
from django.utils import timezone

from tasks_app import lifecycle, tokens
from tasks_app.models import Attempt, Run, SchedulerState, Task
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def node(name: str, *, labels=("linux",), state=Worker.State.ONLINE, capacity=1, **fields):
    return Worker.objects.create(
        name=name,
        labels=list(labels),
        state=state,
        capacity=capacity,
        credential_hash=tokens.digest(f"wkr_{name}"),
        last_heartbeat=timezone.now(),
        **fields,
    )


@pytest.fixture
def linux_task():
    return Task.objects.create(name="report", command="true", labels=["linux"])


def waiting_text(client, run: Run) -> str:
    html = client.get(f"/runs/{run.pk}/").content.decode()
    found = re.search(r'<p class="notice" id="run-waiting">(.*?)</p>', html, flags=re.S)
    assert found, "the page says nothing about what the run waits for"
    return " ".join(unescape(found.group(1)).split())


def test_it_says_no_worker_has_the_labels(bob_client, linux_task):
    node("mac-1", labels=["macos"])
    run = lifecycle.trigger_run(linux_task)

    assert waiting_text(bob_client, run) == (
        "No worker has the labels linux: add one with them, or change the task's labels."
    )


def test_it_says_the_scheduler_is_paused_and_by_whom(bob_client, linux_task):
    node("node-1")
    SchedulerState.set_paused(True, by="carol")
    run = lifecycle.trigger_run(linux_task)

    assert waiting_text(bob_client, run) == (
        "The scheduler is paused by carol: nothing new is dispatched until it is resumed."
    )


def test_it_says_which_worker_has_it_while_the_attempt_is_assigned(bob_client, linux_task):
    worker = node("node-1")
    run = lifecycle.trigger_run(linux_task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    # Paused after the assignment: the assignment is the reason, not the pause.
    SchedulerState.set_paused(True, by="carol")

    assert waiting_text(bob_client, run) == (
        "Assigned to node-1, which has not accepted it yet; waiting for the command to start."
    )
    assert lifecycle.mark_accepted(worker.pk, attempt.pk)
    assert "node-1, which accepted it" in waiting_text(bob_client, run)


def test_it_says_the_only_matching_workers_do_not_take_work(bob_client, linux_task):
    node("node-1", state=Worker.State.DRAINING, drain_requested=True)
    node("node-2", state=Worker.State.OFFLINE)
    node("mac-1", labels=["macos"])
    run = lifecycle.trigger_run(linux_task)

    assert waiting_text(bob_client, run) == (
        "No worker with the labels linux takes new work: node-1 (draining), node-2 (offline)."
    )


def test_it_says_every_matching_worker_is_busy(bob_client, linux_task):
    worker = node("node-1", capacity=1)
    first = lifecycle.trigger_run(linux_task)
    assert lifecycle.assign(first.attempts.get().pk, worker.pk, worker.name)
    run = lifecycle.trigger_run(linux_task)

    assert waiting_text(bob_client, run) == (
        "The only online worker with the labels linux, node-1, is busy (1 of 1 slots); "
        "it starts when a slot frees up."
    )


def test_it_says_a_retry_waits_for_its_backoff(bob_client):
    task = Task.objects.create(
        name="flaky", command="false", labels=["linux"], max_retries=1, retry_backoff_s=100
    )
    worker = node("node-1")
    run = lifecycle.trigger_run(task)
    first = run.attempts.get()
    lifecycle.assign(first.pk, worker.pk, worker.name)
    lifecycle.finish(worker.pk, first.pk, lifecycle.Result("failed", 1, "exit code 1", None, None))
    assert run.attempts.filter(try_number=2, status=Attempt.Status.QUEUED).exists()

    # 100 s, with 50-100 % jitter.
    assert re.fullmatch(
        r"Waiting out its retry backoff: eligible again in (\d\d\.\d s|1 min \d+ s)\.",
        waiting_text(bob_client, run),
    )


def test_a_cancelled_run_says_who_cancelled_it(bob_client, linux_task):
    run = lifecycle.trigger_run(linux_task)

    bob_client.post(f"/runs/{run.pk}/cancel/")

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()
    cancelled = re.search(r'<dd id="run-cancelled">(.*?)</dd>', html, flags=re.S).group(1)
    assert re.sub(r"<[^>]+>", "", cancelled).startswith("by bob at ")
    assert 'id="run-waiting"' not in html
    assert Run.objects.get(pk=run.pk).cancel_requested_by == "bob"


def test_a_killed_command_says_by_which_signal(bob_client, linux_task):
    worker = node("node-1")
    run = lifecycle.trigger_run(linux_task)
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    lifecycle.finish(worker.pk, attempt.pk, lifecycle.Result("failed", -15, "killed", None, None))

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert '<dd class="exit-code" title="exit code -15">killed by SIGTERM</dd>' in html


def test_a_run_of_a_deleted_task_says_so(bob_client, linux_task):
    run = lifecycle.trigger_run(linux_task)
    task_id = linux_task.pk
    linux_task.delete()

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert 'id="task-deleted"' in html
    assert "Its task “report” was deleted on" in html
    runs = bob_client.get("/runs/").content.decode()
    assert f'<option value="{task_id}" >report (deleted)</option>' in runs
    filtered = bob_client.get(f"/runs/?task={task_id}").content.decode()
    assert f'href="/runs/{run.pk}/"' in filtered
