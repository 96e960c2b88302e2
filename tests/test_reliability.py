"""Retries, cancel, accept timeout, timeout backstop, late results, pause, drain:
the lifecycle and liveness rules, called directly against the database."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from django.utils import timezone

from tasks_app import lifecycle
from tasks_app.exceptions import RunNotCancellable, RunNotRetryable
from tasks_app.models import Attempt, Run, SchedulerState, Task
from workers_app import dispatch, liveness
from workers_app.models import Worker
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db


def _result(status: str, exit_code: int | None = 0, reason: str = "") -> lifecycle.Result:
    now = time.time()
    return lifecycle.Result(status, exit_code, reason, now - 1, now)


@pytest.fixture
def online(worker):
    Worker.objects.filter(pk=worker.pk).update(
        state=Worker.State.ONLINE, last_heartbeat=timezone.now()
    )
    worker.refresh_from_db()
    return worker


def _running(run: Run, worker: Worker) -> Attempt:
    attempt = run.attempts.order_by("-try_number").first()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, time.time(), 4242)
    attempt.refresh_from_db()
    return attempt


def test_it_retries_a_failed_attempt_with_backoff_until_retries_run_out(online):
    task = Task.objects.create(name="flaky", command="false", max_retries=2, retry_backoff_s=4)
    run = lifecycle.trigger_run(task)

    for try_number in (1, 2, 3):
        attempt = _running(run, online) if try_number == 1 else None
        if attempt is None:
            attempt = run.attempts.get(try_number=try_number)
            assert attempt.status == Attempt.Status.QUEUED
            # Backoff: base * 2^(n-2) for the retry before it, times 0.5-1.0 jitter.
            delay = (attempt.not_before - attempt.queued_at).total_seconds()
            ceiling = 4 * 2 ** (try_number - 2)
            assert ceiling * 0.5 - 0.1 <= delay <= ceiling + 0.1
            Attempt.objects.filter(pk=attempt.pk).update(ready_at=timezone.now())
            attempt = _running(run, online)
        lifecycle.finish(online.pk, attempt.pk, _result("failed", 1, "exit code 1"))

    run.refresh_from_db()
    assert run.attempts.count() == 3
    assert run.status == Run.Status.FAILED
    assert run.reason == "exit code 1 (after 3 attempts)"


def test_backoff_is_capped_and_jittered():
    delays = [lifecycle.backoff_seconds(20, base=1, cap=30) for _ in range(200)]
    assert all(15 <= d <= 30 for d in delays)
    assert len({round(d, 3) for d in delays}) > 50


def test_dispatch_waits_for_a_retrys_backoff(online, task):
    run = lifecycle.trigger_run(task)
    Attempt.objects.filter(run=run).update(ready_at=timezone.now() + dt.timedelta(seconds=60))
    assert dispatch.dispatch() == []
    Attempt.objects.filter(run=run).update(ready_at=timezone.now() - dt.timedelta(seconds=1))
    assert dispatch.dispatch() == [(online.pk, run.attempts.get().pk)]


def test_a_succeeded_attempt_is_not_retried(online):
    task = Task.objects.create(name="fine", command="true", max_retries=3)
    run = lifecycle.trigger_run(task)
    lifecycle.finish(online.pk, _running(run, online).pk, _result("succeeded"))
    run.refresh_from_db()
    assert (run.status, run.attempts.count()) == (Run.Status.SUCCEEDED, 1)


def test_a_lost_attempt_is_retried_and_the_run_stays_running(online):
    task = Task.objects.create(name="survives", command="true", max_retries=1, retry_backoff_s=0)
    run = lifecycle.trigger_run(task)
    attempt = _running(run, online)

    assert lifecycle.mark_lost(online.pk, "worker lost: test") == [attempt.pk]

    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    retry = run.attempts.get(try_number=2)
    assert retry.status == Attempt.Status.QUEUED


def test_a_late_report_for_a_lost_attempt_is_kept_aside_and_never_applied(online, task):
    run = lifecycle.trigger_run(task)
    attempt = _running(run, online)
    lifecycle.mark_lost(online.pk, "worker lost: no heartbeat for 15s")

    outcome = lifecycle.finish(online.pk, attempt.pk, _result("succeeded"))
    again = lifecycle.finish(online.pk, attempt.pk, _result("succeeded"))

    attempt.refresh_from_db()
    run.refresh_from_db()
    assert (outcome, again) == (lifecycle.Outcome.LATE, lifecycle.Outcome.DUPLICATE)
    assert attempt.status == Attempt.Status.LOST
    assert attempt.is_superseded
    assert (attempt.late_status, attempt.late_exit_code) == ("succeeded", 0)
    assert run.status == Run.Status.FAILED


def test_cancelling_a_queued_run_is_immediate(task):
    run = lifecycle.trigger_run(task)
    run = lifecycle.cancel_run(run)
    assert run.status == Run.Status.CANCELLED
    assert run.attempts.get().status == Attempt.Status.CANCELLED
    with pytest.raises(RunNotCancellable):
        lifecycle.cancel_run(run)


def test_cancelling_a_running_run_asks_its_agent_and_prevents_retries(
    online, django_capture_on_commit_callbacks
):
    from tasks_app.signals import stop_requested

    task = Task.objects.create(name="long", command="sleep 60", max_retries=5)
    run = lifecycle.trigger_run(task)
    attempt = _running(run, online)
    sent = []

    def receiver(sender, attempts, **kwargs):
        sent.extend(attempts)

    stop_requested.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            run = lifecycle.cancel_run(run)
    finally:
        stop_requested.disconnect(receiver)

    assert sent == [(online.pk, attempt.pk)]
    assert run.status == Run.Status.RUNNING and run.cancel_requested_at
    # The agent kills it; even a "failed" report now ends the run cancelled, no retry.
    lifecycle.finish(online.pk, attempt.pk, _result("failed", -15, "killed by signal 15"))
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert run.attempts.count() == 1
    # Nothing is left for a reconnecting agent to be told to stop.
    assert not Attempt.objects.filter(
        worker=online, status__in=Attempt.ACTIVE, run__cancel_requested_at__isnull=False
    ).exists()


def test_retrying_a_finished_run_reruns_its_snapshot(online, task):
    run = lifecycle.trigger_run(task)
    with pytest.raises(RunNotRetryable):
        lifecycle.retry_run(run)
    lifecycle.finish(online.pk, _running(run, online).pk, _result("failed", 3, "exit code 3"))
    Task.objects.filter(pk=task.pk).update(command="echo changed")

    retry = lifecycle.retry_run(Run.objects.get(pk=run.pk))

    assert (retry.trigger, retry.retry_of_id, retry.status) == ("retry", run.pk, "queued")
    assert retry.definition["command"] == 'python3 -c "print(6*7)"'


def test_an_assignment_not_accepted_in_time_goes_back_to_the_queue(online, task, settings):
    settings.SCHEDULER_ACCEPT_TIMEOUT_S = 5
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, online.pk, online.name)

    assert lifecycle.requeue_unaccepted(timezone.now()) == []
    later = timezone.now() + dt.timedelta(seconds=6)
    assert lifecycle.requeue_unaccepted(later) == [attempt.pk]

    attempt.refresh_from_db()
    assert (attempt.status, attempt.worker_id) == (Attempt.Status.QUEUED, None)
    # A late "accepted" from the agent is refused (the consumer then sends cancel).
    assert lifecycle.mark_accepted(online.pk, attempt.pk) is False


def test_an_accepted_assignment_stays_assigned(online, task, settings):
    settings.SCHEDULER_ACCEPT_TIMEOUT_S = 5
    attempt = lifecycle.trigger_run(task).attempts.get()
    lifecycle.assign(attempt.pk, online.pk, online.name)
    assert lifecycle.mark_accepted(online.pk, attempt.pk)
    assert lifecycle.requeue_unaccepted(timezone.now() + dt.timedelta(seconds=60)) == []


def test_the_master_backstops_a_timeout_the_agent_did_not_report(online, settings):
    settings.SCHEDULER_TIMEOUT_GRACE_S = 30
    task = Task.objects.create(name="hangs", command="sleep 999", timeout=10)
    run = lifecycle.trigger_run(task)
    attempt = _running(run, online)

    assert lifecycle.time_out_overdue(timezone.now() + dt.timedelta(seconds=35)) == []
    assert lifecycle.time_out_overdue(timezone.now() + dt.timedelta(seconds=41)) == [attempt.pk]

    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.TIMED_OUT
    assert attempt.reason == "timed out after 10s (master backstop: the agent did not report)"
    assert attempt.closed_by_master


def test_pausing_stops_dispatch_and_resuming_restarts_it(online, task):
    SchedulerState.set_paused(True, by="bob")
    run = lifecycle.trigger_run(task)
    assert dispatch.dispatch() == []
    state = SchedulerState.current()
    assert (state.paused, state.paused_by) == (True, "bob")

    SchedulerState.set_paused(False)
    assert dispatch.dispatch() == [(online.pk, run.attempts.get().pk)]


def test_draining_and_disabled_workers_get_no_new_work(online, task):
    lifecycle.trigger_run(task)
    liveness.apply_state(online, Worker.State.DRAINING)
    assert dispatch.dispatch() == []
    online.refresh_from_db()
    assert (online.state, online.drain_requested) == (Worker.State.DRAINING, True)

    liveness.apply_state(online, Worker.State.DISABLED)
    assert dispatch.dispatch() == []

    Worker.objects.filter(pk=online.pk).update(channel_name="specific..inmemory!abc")
    liveness.apply_state(online, Worker.State.ONLINE)
    online.refresh_from_db()
    assert (online.state, online.drain_requested) == (Worker.State.ONLINE, False)
    assert len(dispatch.dispatch()) == 1


def test_an_operators_drain_survives_a_reconnect_but_not_an_agents_restart_flag(online):
    liveness.apply_state(online, Worker.State.DRAINING)
    hello = {"capacity": 2, "running": [], "draining": False}
    assert liveness.hello(online.pk, "chan-1", hello).worker.state == Worker.State.DRAINING
    liveness.apply_state(online, Worker.State.ONLINE)
    assert liveness.hello(online.pk, "chan-2", hello).worker.state == Worker.State.ONLINE
    shutting_down = {**hello, "draining": True}
    assert liveness.hello(online.pk, "chan-3", shutting_down).worker.state == Worker.State.DRAINING


def test_a_hello_keeps_spooled_results_and_stops_zombies(online, task):
    finished_offline = _running(lifecycle.trigger_run(task), online)
    zombie = _running(lifecycle.trigger_run(task), online)
    lifecycle.mark_lost(online.pk, "worker lost: test", keep=[finished_offline.pk])

    reconciled = liveness.hello(
        online.pk, "chan", {"capacity": 2, "running": [zombie.pk], "spooled": [finished_offline.pk]}
    )

    finished_offline.refresh_from_db()
    assert finished_offline.status == Attempt.Status.RUNNING
    assert reconciled.lost == []
    assert reconciled.cancel == [zombie.pk]


def test_the_service_does_not_reap_during_its_own_recovery(online, settings):
    settings.SCHEDULER_LOST_AFTER_S = 15
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - dt.timedelta(hours=1)
    )
    service = SchedulerService()
    assert service.reap_lost_workers() is False
    service.alive_since -= 16
    assert service.reap_lost_workers() is True
    online.refresh_from_db()
    assert online.state == Worker.State.OFFLINE


def test_the_service_restarts_the_liveness_clock_after_a_database_outage(monkeypatch):
    from django.db import OperationalError

    service = SchedulerService()
    service.alive_since -= 1000

    def broken():
        raise OperationalError("database is locked")

    monkeypatch.setattr(service, "dispatch_queued", broken)
    service.tick()
    assert service.database_down
    monkeypatch.setattr(service, "dispatch_queued", lambda: False)
    before = time.monotonic()
    service.tick()
    assert not service.database_down
    assert service.alive_since >= before


def test_a_cancelled_runs_unaccepted_assignment_is_cancelled_not_requeued(online, task, settings):
    settings.SCHEDULER_ACCEPT_TIMEOUT_S = 5
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, online.pk, online.name)
    lifecycle.cancel_run(run)  # the agent never got the assign, so never answers

    assert lifecycle.requeue_unaccepted(timezone.now() + dt.timedelta(seconds=6)) == [attempt.pk]

    attempt.refresh_from_db()
    run.refresh_from_db()
    assert attempt.status == Attempt.Status.CANCELLED
    assert run.status == Run.Status.CANCELLED
    assert dispatch.dispatch() == []


def test_dispatch_looks_past_old_work_nobody_can_run(online, task):
    gpu = Task.objects.create(name="gpu-only", command="true", labels=["gpu"])
    for _ in range(7):
        lifecycle.trigger_run(gpu)
    runnable = lifecycle.trigger_run(task)

    assert dispatch.dispatch() == [(online.pk, runnable.attempts.get().pk)]


def test_deleting_a_worker_loses_its_running_attempts_instead_of_orphaning_them(online):
    task = Task.objects.create(name="orphan", command="sleep 9", max_retries=1, retry_backoff_s=0)
    run = lifecycle.trigger_run(task)
    attempt = _running(run, online)

    online.delete()

    attempt.refresh_from_db()
    assert (attempt.status, attempt.reason) == ("lost", "worker lost: the worker was deleted")
    assert run.attempts.get(try_number=2).status == Attempt.Status.QUEUED


def test_the_timeout_backstop_ignores_a_wrong_agent_clock(online, settings):
    settings.SCHEDULER_TIMEOUT_GRACE_S = 30
    task = Task.objects.create(name="skewed", command="sleep 999", timeout=600)
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    lifecycle.assign(attempt.pk, online.pk, online.name)
    # The agent's clock is an hour behind.
    lifecycle.mark_started(online.pk, attempt.pk, time.time() - 3600, 7)

    assert lifecycle.time_out_overdue(timezone.now() + dt.timedelta(seconds=60)) == []
    assert lifecycle.time_out_overdue(timezone.now() + dt.timedelta(seconds=631)) == [attempt.pk]


def test_the_service_gives_agents_a_grace_period_after_its_own_restart(online, task, settings):
    settings.SCHEDULER_ACCEPT_TIMEOUT_S = 1
    attempt = lifecycle.trigger_run(task).attempts.get()
    lifecycle.assign(attempt.pk, online.pk, online.name)
    Attempt.objects.filter(pk=attempt.pk).update(
        assigned_at=timezone.now() - dt.timedelta(seconds=60)
    )
    service = SchedulerService()

    assert service.requeue_unaccepted() is False
    assert service.time_out_overdue() is False
    service.alive_since -= settings.SCHEDULER_LOST_AFTER_S + 1
    assert service.requeue_unaccepted() is True


def test_a_worker_heard_from_but_not_yet_written_is_not_reaped(online, settings):
    settings.SCHEDULER_LOST_AFTER_S = 15
    silent_since = timezone.now() - dt.timedelta(minutes=5)
    Worker.objects.filter(pk=online.pk).update(last_heartbeat=silent_since)
    # Its heartbeat arrived; the server has noted it but not yet written it (a
    # backlog, or simply between two flushes).
    liveness.seen(online.pk)

    assert liveness.reap_lost() == []

    online.refresh_from_db()
    assert online.state == Worker.State.ONLINE
    # The reaper wrote what it had heard before it judged.
    assert online.last_heartbeat > silent_since + dt.timedelta(minutes=4)


def test_heartbeats_are_written_in_one_statement_only_when_new(online):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    other = Worker.objects.create(name="node-2", credential_hash="x", state="online")
    liveness.seen(online.pk)
    liveness.seen(other.pk)

    with CaptureQueriesContext(connection) as captured:
        assert liveness.flush_heartbeats() == 2
        assert liveness.flush_heartbeats() == 0  # nothing new since

    # One prepared UPDATE, executed for each worker (Django logs it as "2 times: ...").
    [query] = captured.captured_queries
    assert query["sql"].startswith('2 times: UPDATE "workers_app_worker"')


def test_the_service_does_not_judge_liveness_after_falling_behind_its_own_loop(online, settings):
    settings.SCHEDULER_LOST_AFTER_S = 15
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - dt.timedelta(hours=1)
    )
    service = SchedulerService()
    service.alive_since -= 16
    # The event loop woke 3 s late: frames may be waiting unread in its sockets.
    service.note_lag(3.0)

    assert service.reap_lost_workers() is False
    online.refresh_from_db()
    assert online.state == Worker.State.ONLINE
    # A lag of a few milliseconds is nothing to worry about.
    service.alive_since -= 16
    service.note_lag(0.005)
    assert service.reap_lost_workers() is True
