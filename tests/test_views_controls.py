"""Dashboard controls for reliability: cancel, retry, pause, drain, superseded results."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from tasks_app import lifecycle
from tasks_app.models import Attempt, Run, SchedulerState
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def _start(run: Run, worker: Worker) -> Attempt:
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, attempt.pk, time.time(), 99)
    return Attempt.objects.get(pk=attempt.pk)


def test_a_queued_run_shows_cancel_and_is_cancelled_from_the_page(bob_client, task):
    run = lifecycle.trigger_run(task)
    page = bob_client.get(reverse("tasks:run-detail", args=[run.pk])).content.decode()
    assert 'id="cancel-run"' in page and 'id="retry-run"' not in page

    response = bob_client.post(reverse("tasks:run-cancel", args=[run.pk]), HTTP_HX_REQUEST="true")

    assert response["HX-Redirect"] == reverse("tasks:run-detail", args=[run.pk])
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    page = bob_client.get(reverse("tasks:run-detail", args=[run.pk])).content.decode()
    assert f"Run #{run.pk} cancelled." in page
    assert 'id="retry-run"' in page and 'id="cancel-run"' not in page


def test_cancelling_a_finished_run_says_why_and_changes_nothing(bob_client, task):
    run = lifecycle.cancel_run(lifecycle.trigger_run(task))
    response = bob_client.post(reverse("tasks:run-cancel", args=[run.pk]), follow=True)
    assert f"Not cancelled: run {run.pk} already cancelled." in response.content.decode()


def test_retry_creates_a_new_run_of_the_snapshot_and_opens_it(bob_client, bob, task):
    run = lifecycle.cancel_run(lifecycle.trigger_run(task))

    response = bob_client.post(reverse("tasks:run-retry", args=[run.pk]))

    retry = Run.objects.exclude(pk=run.pk).get()
    assert response.status_code == 302
    assert response["Location"] == reverse("tasks:run-detail", args=[retry.pk])
    assert (retry.retry_of_id, retry.trigger, retry.created_by) == (run.pk, "retry", bob)
    page = bob_client.get(response["Location"]).content.decode()
    assert f'retry of <a href="{reverse("tasks:run-detail", args=[run.pk])}">#{run.pk}</a>' in page


def test_pause_shows_a_banner_on_every_page_with_the_running_count(bob_client, worker, task):
    _start(lifecycle.trigger_run(task), worker)

    response = bob_client.post(reverse("tasks:pause"), {"next": reverse("workers:list")})

    assert response["Location"] == reverse("workers:list")
    assert SchedulerState.current().paused
    for url in (reverse("tasks:list"), reverse("tasks:runs"), reverse("workers:list")):
        page = bob_client.get(url).content.decode()
        assert "Scheduler paused by bob" in page
        assert "no new work is dispatched; 1 run still running." in page
        assert 'id="resume-scheduler"' in page

    bob_client.post(reverse("tasks:resume"))
    page = bob_client.get(reverse("tasks:list")).content.decode()
    assert "Scheduler paused" not in page and 'id="pause-scheduler"' in page


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example/",  # browsers read a backslash as a slash: //evil.example
        "/\\/evil.example/",
        "///evil.example/",
        "http://testserver/tasks/",  # even our own host: a path or nothing
        "javascript:alert(1)",
    ],
)
def test_pause_and_resume_refuse_a_redirect_to_another_site(bob_client, target):
    for name in ("tasks:pause", "tasks:resume"):
        response = bob_client.post(reverse(name), {"next": target})
        assert response["Location"] == reverse("tasks:list"), name


def test_pause_keeps_a_path_with_a_query(bob_client):
    target = reverse("tasks:runs") + "?status=failed"
    response = bob_client.post(reverse("tasks:pause"), {"next": target})
    assert response["Location"] == target


@pytest.mark.parametrize(
    "action, state, drain_requested",
    [("drain", "draining", True), ("disable", "disabled", False)],
)
def test_worker_buttons_drain_and_disable(bob_client, worker, action, state, drain_requested):
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE, channel_name="x")

    response = bob_client.post(
        reverse("workers:state", args=[worker.pk, action]), HTTP_HX_REQUEST="true"
    )

    worker.refresh_from_db()
    assert (worker.state, worker.drain_requested) == (state, drain_requested)
    page = response.content.decode()
    assert page.lstrip().startswith('<div id="worker-table"')
    assert f'<span class="badge {state}">{state}</span>' in page


def test_resume_brings_a_drained_connected_worker_back_online(bob_client, worker):
    Worker.objects.filter(pk=worker.pk).update(
        state=Worker.State.DRAINING, drain_requested=True, channel_name="x"
    )
    page = bob_client.get(reverse("workers:list")).content.decode()
    assert 'data-action="resume"' in page

    bob_client.post(reverse("workers:state", args=[worker.pk, "resume"]))

    worker.refresh_from_db()
    assert (worker.state, worker.drain_requested) == ("online", False)


def test_an_unknown_worker_action_is_a_404(bob_client, worker):
    response = bob_client.post(reverse("workers:state", args=[worker.pk, "explode"]))
    assert response.status_code == 404
    worker.refresh_from_db()
    assert worker.state == Worker.State.OFFLINE


def test_the_run_page_shows_a_superseded_attempt_and_its_late_result(bob_client, worker, task):
    run = lifecycle.trigger_run(task)
    attempt = _start(run, worker)
    lifecycle.mark_lost(worker.pk, "worker lost: no heartbeat for 15s")
    now = time.time()
    lifecycle.finish(worker.pk, attempt.pk, lifecycle.Result("succeeded", 0, "", now - 1, now))

    page = bob_client.get(reverse("tasks:run-detail", args=[run.pk])).content.decode()

    assert '<span class="badge superseded">superseded</span>' in page
    assert "declared lost by the master; the agent reported" in page
    assert "<strong>succeeded</strong> (exit 0)" in page


def test_the_api_pauses_and_resumes_the_scheduler(client, bob_token):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {bob_token}"}
    paused = client.post("/api/scheduler/pause", **auth).json()
    assert (paused["paused"], paused["paused_by"], paused["runs_running"]) == (True, "bob", 0)
    assert client.get("/api/scheduler", **auth).json()["paused"] is True
    resumed = client.post("/api/scheduler/resume", **auth).json()
    assert (resumed["paused"], resumed["paused_at"]) == (False, None)


def test_the_api_drains_a_worker_and_refuses_unknown_actions(client, bob_token, worker):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {bob_token}"}
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE)
    body = client.post(f"/api/workers/{worker.pk}/drain", **auth).json()
    assert body["state"] == "draining"
    bad = client.post(f"/api/workers/{worker.pk}/explode", **auth)
    assert bad.status_code == 404
    assert (
        bad.json()["error"] == "unknown action 'explode'; use one of drain, resume, disable, enable"
    )


def test_the_api_cancels_and_retries_runs(client, bob_token, task):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {bob_token}"}
    run = lifecycle.trigger_run(task)
    assert client.post(f"/api/runs/{run.pk}/retry", **auth).status_code == 409
    cancelled = client.post(f"/api/runs/{run.pk}/cancel", **auth).json()
    assert cancelled["status"] == "cancelled"
    assert client.post(f"/api/runs/{run.pk}/cancel", **auth).json() == {
        "error": f"run {run.pk} already cancelled"
    }
    retry = client.post(f"/api/runs/{run.pk}/retry", **auth)
    assert retry.status_code == 201
    assert (retry.json()["retry_of"], retry.json()["trigger"]) == (run.pk, "retry")
    assert client.post("/api/runs/999999/cancel", **auth).status_code == 404
