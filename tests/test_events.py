"""The outbox: one event per state change, in order, in the change's transaction.

Runs are driven through the real code paths: the agent websocket over the
real consumer and writer (as tests/test_consumer.py does), or the lifecycle
functions the writer and the service call. Events are read back from the
table; what is announced is read from the channel layer's group.
"""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks_app import events, lifecycle
from tasks_app.lifecycle import Result
from tasks_app.models import Attempt, Event, Run, SchedulerState, Task
from tests.test_consumer import (
    TIMEOUT,
    assign_for,
    barrier,
    finished_frame,
    hello_frame,
    welcome_for,
)

# The consumer tests' fixture that opens agent sockets, under a name of its own here.
from tests.test_consumer import connect as open_agent_socket  # noqa: F401
from workers_app import liveness, registration
from workers_app.models import EnrollmentToken, Worker

E = events


def kinds_of(**filters) -> list[str]:
    return list(Event.objects.filter(**filters).order_by("id").values_list("kind", flat=True))


def events_of(**filters) -> list[Event]:
    return list(Event.objects.filter(**filters).order_by("id"))


def result(exit_code: int = 0, status: str | None = None, output_bytes: int = 0) -> Result:
    now = timezone.now().timestamp()
    return Result(
        status=status or ("succeeded" if exit_code == 0 else "failed"),
        exit_code=exit_code,
        reason="" if exit_code == 0 else f"exit code {exit_code}",
        started_at=now - 2,
        finished_at=now - 1,
        output_bytes=output_bytes,
    )


def running(task: Task, worker: Worker) -> Attempt:
    """A run of the task whose attempt runs on the worker, as the agent reported."""
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1234)
    return attempt


@pytest.fixture(autouse=True)
def nothing_pending():
    """A summary left unannounced by an earlier test must not leak into this one."""
    events._pending = None
    yield
    events._pending = None


@pytest.fixture
def online(worker) -> Worker:
    worker.state = Worker.State.ONLINE
    worker.approved_at = worker.approved_at or timezone.now()
    worker.last_heartbeat = timezone.now()
    worker.save()
    return worker


# --- a run's life, over the real agent socket -------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_it_records_a_runs_whole_life_once_each_in_order_and_announces_it(
    open_agent_socket,  # noqa: F811
    worker,
    worker_credential,
    task,
    settings,
):
    settings.SCHEDULER_HEARTBEAT_S = 5.0
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    settings.SCHEDULER_SELF_FENCE = True
    layer = get_channel_layer()
    await layer.flush()
    channel = await layer.new_channel()
    await layer.group_add(events.GROUP, channel)
    task.labels = ["linux"]
    await database_sync_to_async(task.save)()
    agent = await open_agent_socket(worker_credential)
    await agent.send_json_to(hello_frame())
    assert await agent.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    await barrier(agent)

    run = await database_sync_to_async(lifecycle.trigger_run)(task)
    attempt = await database_sync_to_async(lambda: run.attempts.get())()
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    await agent.send_json_to({"type": "accepted", "attempt": attempt.pk})
    await barrier(agent)
    frame = finished_frame(attempt, 0, output_bytes=1229)
    await agent.send_json_to(
        {"type": "started", "attempt": attempt.pk, "pid": 123, "started_at": frame["started_at"]}
    )
    await agent.send_json_to(frame)
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}

    rows = await database_sync_to_async(events_of)(run_id=run.pk)
    assert [(e.kind, e.attempt_id, e.worker_id, e.task_id) for e in rows] == [
        (E.RUN_QUEUED, None, None, task.pk),
        (E.ATTEMPT_ASSIGNED, attempt.pk, worker.pk, None),
        (E.ATTEMPT_ACCEPTED, attempt.pk, worker.pk, None),
        (E.ATTEMPT_STARTED, attempt.pk, worker.pk, None),
        (E.RUN_STARTED, None, None, task.pk),
        (E.ATTEMPT_FINISHED, attempt.pk, worker.pk, None),
        (E.RUN_FINISHED, None, None, task.pk),
    ]
    data = [e.data for e in rows]
    assert data[0] == {"trigger": "manual"}
    assert data[1] == {"worker": "node-1"}
    assert data[3] == {"pid": 123}
    assert data[5] == {"status": "succeeded", "exit_code": 0, "reason": "", "output_bytes": 1229}
    finished = await database_sync_to_async(Run.objects.get)(pk=run.pk)
    duration = (finished.finished_at - finished.started_at).total_seconds()
    assert data[6] == {"status": "succeeded", "reason": "", "duration_s": round(duration, 3)}
    assert [e.id for e in rows] == sorted(e.id for e in rows)
    assert rows[0].at <= rows[-1].at

    # Announced after commit on the group, maybe in several messages: together
    # they name every kind and the run, up to the last event's id.
    last_id = rows[-1].id
    seen_kinds, seen_runs, seen_workers, high = set(), set(), set(), 0
    while high < last_id:
        message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        assert message["type"] == "events.committed"
        high = max(high, message["last_id"])
        seen_kinds |= set(message["kinds"])
        seen_runs |= set(message["runs"])
        seen_workers |= set(message["workers"])
    assert high == last_id
    assert {e.kind for e in rows} <= seen_kinds
    assert run.pk in seen_runs
    assert worker.pk in seen_workers
    assert await agent.receive_nothing()


# --- lifecycle paths, inside the test's transaction -------------------------------


@pytest.mark.django_db
def test_it_records_a_lost_attempt_and_its_retry_then_the_retrys_life(task, online):
    task.max_retries = 1
    task.retry_backoff_s = 4.0
    task.save()
    first = running(task, online)

    lifecycle.lose([first.pk], "worker lost: no heartbeat for 15s")

    retry = Attempt.objects.get(run_id=first.run_id, try_number=2)
    rows = events_of(run_id=first.run_id)
    assert [e.kind for e in rows] == [
        E.RUN_QUEUED,
        E.ATTEMPT_ASSIGNED,
        E.ATTEMPT_ACCEPTED,
        E.ATTEMPT_STARTED,
        E.RUN_STARTED,
        E.ATTEMPT_LOST,
        E.ATTEMPT_QUEUED,
    ]
    lost, queued = rows[-2:]
    assert (lost.attempt_id, lost.worker_id) == (first.pk, online.pk)
    assert lost.data == {"reason": "worker lost: no heartbeat for 15s"}
    assert queued.attempt_id == retry.pk
    assert queued.data["try_number"] == 2
    assert queued.data["shard_index"] == 0
    # Backoff with jitter: 50-100% of the base for the first retry.
    assert 2.0 <= queued.data["delay_s"] <= 4.0
    assert queued.data["delay_s"] == round((retry.ready_at - retry.queued_at).total_seconds(), 3)

    # A lost attempt is not retried twice, and a second report of it is superseded.
    assert lifecycle.lose([first.pk], "again") == []
    assert lifecycle.finish(online.pk, first.pk, result(0)) is lifecycle.Outcome.LATE
    assert kinds_of(run_id=first.run_id)[-1] == E.ATTEMPT_SUPERSEDED
    assert events_of(run_id=first.run_id)[-1].data == {
        "status": "succeeded",
        "exit_code": 0,
        "reason": "",
        "closed_as": "lost",
    }

    assert lifecycle.assign(retry.pk, online.pk, online.name)
    assert lifecycle.mark_started(online.pk, retry.pk, None, 99)
    assert lifecycle.finish(online.pk, retry.pk, result(3)) is lifecycle.Outcome.STORED
    assert kinds_of(run_id=first.run_id)[-5:] == [
        E.ATTEMPT_ASSIGNED,
        E.ATTEMPT_ACCEPTED,
        E.ATTEMPT_STARTED,  # the run is running already: no second run.started
        E.ATTEMPT_FINISHED,
        E.RUN_FINISHED,  # no retries left
    ]
    assert events_of(run_id=first.run_id)[-1].data["status"] == "failed"
    assert kinds_of(run_id=first.run_id).count(E.RUN_STARTED) == 1


@pytest.mark.django_db
def test_it_records_a_cancel_of_a_queued_run(task):
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()

    lifecycle.cancel_run(run, by="bob")

    rows = events_of(run_id=run.pk)
    assert [(e.kind, e.attempt_id, e.data) for e in rows] == [
        (E.RUN_QUEUED, None, {"trigger": "manual"}),
        (E.RUN_CANCEL_REQUESTED, None, {"by": "bob"}),
        (E.ATTEMPT_FINISHED, attempt.pk, {"status": "cancelled", "reason": "cancelled"}),
        (E.RUN_FINISHED, None, {"status": "cancelled", "reason": "", "duration_s": None}),
    ]


@pytest.mark.django_db
def test_it_records_a_cancel_of_a_running_run_when_the_agent_reports_it(task, online):
    attempt = running(task, online)
    run = Run.objects.get(pk=attempt.run_id)

    lifecycle.cancel_run(run, by="bob")
    assert kinds_of(run_id=run.pk)[-1] == E.RUN_CANCEL_REQUESTED
    # A second cancel changes nothing, and records nothing.
    lifecycle.cancel_run(run, by="alice")
    assert kinds_of(run_id=run.pk).count(E.RUN_CANCEL_REQUESTED) == 1

    lifecycle.finish(online.pk, attempt.pk, result(-15, status="cancelled"))

    last = events_of(run_id=run.pk)[-2:]
    assert [e.kind for e in last] == [E.ATTEMPT_FINISHED, E.RUN_FINISHED]
    assert last[0].data["status"] == "cancelled"
    assert last[1].data["status"] == "cancelled"
    assert last[1].data["duration_s"] is not None


@pytest.mark.django_db
def test_it_records_an_attempt_timed_out_by_the_master(task, online, settings):
    settings.SCHEDULER_TIMEOUT_GRACE_S = 0
    task.timeout = 1
    task.save()
    attempt = running(task, online)

    assert lifecycle.time_out_overdue(timezone.now() + timezone.timedelta(seconds=5)) == [
        attempt.pk
    ]

    last = events_of(run_id=attempt.run_id)[-2:]
    assert [(e.kind, e.attempt_id, e.worker_id) for e in last] == [
        (E.ATTEMPT_FINISHED, attempt.pk, online.pk),
        (E.RUN_FINISHED, None, None),
    ]
    assert last[0].data["status"] == "timed_out"
    assert last[1].data["status"] == "failed"


@pytest.mark.django_db
def test_it_records_a_requeued_assignment(task, online):
    attempt = lifecycle.trigger_run(task).attempts.get()
    assert lifecycle.assign(attempt.pk, online.pk, online.name)

    assert lifecycle.requeue(online.pk, [attempt.pk], delay_s=1.0) == [attempt.pk]

    last = events_of(run_id=attempt.run_id)[-1]
    assert (last.kind, last.attempt_id, last.worker_id) == (
        E.ATTEMPT_REQUEUED,
        attempt.pk,
        online.pk,
    )
    assert last.data == {"reason": "rejected by the agent", "delay_s": 1.0}


@pytest.mark.django_db
def test_it_records_a_retried_run_on_both_runs(task, online, bob):
    attempt = running(task, online)
    lifecycle.finish(online.pk, attempt.pk, result(1))
    old = Run.objects.get(pk=attempt.run_id)

    new = lifecycle.retry_run(old, user=bob)

    assert [(e.kind, e.data) for e in events_of(run_id=new.pk)] == [
        (E.RUN_QUEUED, {"trigger": "retry", "retry_of": old.pk})
    ]
    last = events_of(run_id=old.pk)[-1]
    assert (last.kind, last.task_id, last.data) == (E.RUN_RETRIED, task.pk, {"new_run_id": new.pk})


@pytest.mark.django_db
def test_a_skipped_run_is_queued_and_finished_at_once(task):
    task.concurrency_limit = 1
    task.busy_policy = Task.BusyPolicy.SKIP
    task.save()
    first = lifecycle.trigger_run(task)

    skipped = lifecycle.trigger_run(task)

    assert skipped.status == Run.Status.SKIPPED
    rows = events_of(run_id=skipped.pk)
    assert [e.kind for e in rows] == [E.RUN_QUEUED, E.RUN_FINISHED]
    assert rows[1].data == {
        "status": "skipped",
        "reason": f"skipped: run #{first.pk} still queued (limit 1)",
        "duration_s": None,
    }


# --- the transaction's guarantees ----------------------------------------------------


class Boom(Exception):
    """Raised to roll a transaction back."""


def rolled_back_trigger(task: Task) -> None:
    before = events.last_id()  # the task's own creation
    with pytest.raises(Boom), transaction.atomic():
        lifecycle.trigger_run(task)
        assert kinds_of(id__gt=before) == [E.RUN_QUEUED]  # written, inside the transaction
        raise Boom
    assert kinds_of(id__gt=before) == []
    assert Run.objects.count() == 0


@pytest.mark.django_db(transaction=True)
async def test_a_rolled_back_trigger_leaves_no_event_and_announces_nothing(task):
    # One event loop for the whole conversation: a Redis layer's channel
    # belongs to the loop that first received on it.
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(events.GROUP, channel)

    await database_sync_to_async(rolled_back_trigger)(task)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.3)
    assert events._pending is None

    # The next committed change is announced alone: nothing of the rolled-back one.
    run = await database_sync_to_async(lifecycle.trigger_run)(task)
    message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
    assert message == {
        "type": "events.committed",
        "last_id": await database_sync_to_async(events.last_id)(),
        "kinds": [E.RUN_QUEUED],
        "runs": [run.pk],
        "tasks": [task.pk],
        "workers": [],
    }


@pytest.mark.django_db
def test_a_batch_of_triggered_runs_writes_its_events_in_one_insert(task):
    def inserts(count: int) -> int:
        with CaptureQueriesContext(connection) as queries:
            lifecycle.trigger_runs([lifecycle.TriggerRequest(task.pk, count=count)])
        table = Event._meta.db_table
        return sum(
            1
            for q in queries.captured_queries
            if q["sql"].lstrip().upper().startswith("INSERT") and table in q["sql"]
        )

    assert inserts(1) == 1
    assert inserts(100) == 1
    assert Event.objects.filter(kind=E.RUN_QUEUED).count() == 101


@pytest.mark.django_db
def test_a_batch_of_results_writes_its_events_in_one_insert(task, online):
    online.capacity = 100
    online.save()
    attempts = [
        a
        for run in lifecycle.trigger_runs([lifecycle.TriggerRequest(task.pk, count=50)])[0]
        for a in run.queued_attempts
    ]
    lifecycle.claim(
        [lifecycle.Claim(online.pk, online.name, a.pk, 100, a.run_id) for a in attempts]
    )
    started = [lifecycle.Started(online.pk, a.pk, None, 7) for a in attempts]
    finished = [lifecycle.Finished(online.pk, a.pk, result(0)) for a in attempts]
    table = Event._meta.db_table

    for apply, items in ((lifecycle.start_many, started), (lifecycle.finish_many, finished)):
        with CaptureQueriesContext(connection) as queries:
            apply(items)
        assert sum(table in q["sql"] for q in queries.captured_queries) == 1
    assert Event.objects.filter(kind=E.ATTEMPT_STARTED).count() == 50
    assert Event.objects.filter(kind=E.RUN_STARTED).count() == 50
    assert Event.objects.filter(kind=E.ATTEMPT_FINISHED).count() == 50
    assert Event.objects.filter(kind=E.RUN_FINISHED, data__status="succeeded").count() == 50


# --- workers ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_it_records_a_worker_online_draining_and_offline_over_its_agents_socket(
    open_agent_socket,  # noqa: F811
    worker,
    worker_credential,
    settings,
):
    settings.SCHEDULER_HEARTBEAT_S = 5.0
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    settings.SCHEDULER_SELF_FENCE = True
    agent = await open_agent_socket(worker_credential)
    await agent.send_json_to(hello_frame())
    assert await agent.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    await agent.send_json_to({"type": "heartbeat", "draining": True})
    await barrier(agent)
    await agent.disconnect()

    async def stored() -> list[tuple]:
        rows = await database_sync_to_async(events_of)(worker_id=worker.pk)
        return [(e.kind, e.data) for e in rows]

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while len(await stored()) < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)  # the disconnect is written by the writer, soon
    assert await stored() == [
        (E.WORKER_ONLINE, {"name": "node-1", "state": "online"}),
        (E.WORKER_DRAINING, {"name": "node-1", "by": "its agent"}),
        (E.WORKER_OFFLINE, {"name": "node-1", "state": "offline", "reason": "disconnected"}),
    ]


@pytest.mark.django_db
def test_it_records_a_reaped_worker_offline_once_and_its_attempts_lost(task, online, settings):
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    attempt = running(task, online)
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - timezone.timedelta(seconds=16)
    )

    assert liveness.reap_lost() == [online.pk]
    assert liveness.reap_lost() == []

    offline = events_of(kind=E.WORKER_OFFLINE)
    assert [(e.worker_id, e.data) for e in offline] == [
        (online.pk, {"name": "node-1", "state": "offline", "reason": "no heartbeat for 15s"})
    ]
    lost = events_of(kind=E.ATTEMPT_LOST)
    assert [(e.attempt_id, e.run_id, e.worker_id) for e in lost] == [
        (attempt.pk, attempt.run_id, online.pk)
    ]
    assert lost[0].id > offline[0].id


@pytest.mark.django_db
def test_it_records_enrollment_approval_and_revocation(alice):
    raw, _ = EnrollmentToken.mint()
    worker, _ = registration.register(
        raw, name="node-9", hostname="box", capacity=2, labels=["linux"]
    )

    assert registration.approve(worker, user=alice, labels=["linux"], capacity=2)
    assert not registration.approve(worker, user=alice, labels=["linux"], capacity=2)
    registration.revoke(worker)
    registration.revoke(worker)

    assert [(e.kind, e.data) for e in events_of(worker_id=worker.pk)] == [
        (E.WORKER_ENROLLED, {"name": "node-9"}),
        (E.WORKER_APPROVED, {"name": "node-9", "by": "alice"}),
        (E.WORKER_REVOKED, {"name": "node-9"}),
    ]


@pytest.mark.django_db
def test_an_auto_approving_token_records_the_approval_with_the_enrollment():
    raw, _ = EnrollmentToken.mint(auto_approve=True)

    worker, _ = registration.register(raw, name="node-8", hostname="box", capacity=1, labels=[])

    assert [(e.kind, e.data) for e in events_of(worker_id=worker.pk)] == [
        (E.WORKER_ENROLLED, {"name": "node-8"}),
        (E.WORKER_APPROVED, {"name": "node-8", "by": "its enrollment token"}),
    ]


@pytest.mark.django_db
def test_it_records_an_operators_drain_resume_disable_and_enable(online):
    for state in ("draining", "online", "disabled", "online"):
        liveness.apply_state(online, state)

    assert kinds_of(worker_id=online.pk) == [
        E.WORKER_DRAINING,
        E.WORKER_ACTIVE,
        E.WORKER_DISABLED,
        E.WORKER_ENABLED,
    ]


# --- the scheduler switch and tasks ---------------------------------------------------


@pytest.mark.django_db
def test_it_records_the_scheduler_paused_and_resumed_once_each():
    SchedulerState.set_paused(True, by="bob")
    SchedulerState.set_paused(True, by="alice")  # paused already: no change
    SchedulerState.set_paused(False, by="otto")

    assert [(e.kind, e.data) for e in events_of()] == [
        (E.SCHEDULER_PAUSED, {"by": "bob"}),
        (E.SCHEDULER_RESUMED, {"by": "otto"}),
    ]
    assert SchedulerState.current().paused_by == ""


@pytest.mark.django_db
def test_it_records_a_task_created_changed_and_deleted_through_the_api(api):
    response = api.post(
        "/api/tasks", {"name": "nightly", "command": "true"}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    pk = response.json()["id"]
    response = api.patch(f"/api/tasks/{pk}", {"command": "false"}, content_type="application/json")
    assert response.status_code == 200, response.content
    assert api.delete(f"/api/tasks/{pk}").status_code == 204

    assert [(e.kind, e.task_id, e.data) for e in events_of(task_id=pk)] == [
        (E.TASK_CREATED, pk, {"name": "nightly"}),
        (E.TASK_CHANGED, pk, {"name": "nightly"}),
        (E.TASK_DELETED, pk, {"name": "nightly"}),
    ]


@pytest.mark.django_db
def test_a_sharded_run_starts_and_finishes_once_whatever_its_shards_do(task, online):
    task.shards = 3
    task.save()
    run = lifecycle.trigger_run(task)
    first, second, third = run.queued_attempts
    assert lifecycle.assign(first.pk, online.pk, online.name)
    assert lifecycle.assign(second.pk, online.pk, online.name)

    lifecycle.start_many([lifecycle.Started(online.pk, a.pk, None, 7) for a in (first, second)])
    # Shard 0 fails for good: the run fails at once (fail fast), the queued
    # shard is cancelled, and the running one's later report ends only itself.
    lifecycle.finish(online.pk, first.pk, result(1))
    lifecycle.finish(online.pk, second.pk, result(-15, status="cancelled"))

    rows = events_of(run_id=run.pk)
    assert [(e.kind, e.attempt_id) for e in rows] == [
        (E.RUN_QUEUED, None),
        (E.ATTEMPT_ASSIGNED, first.pk),
        (E.ATTEMPT_ASSIGNED, second.pk),
        (E.ATTEMPT_ACCEPTED, first.pk),
        (E.ATTEMPT_STARTED, first.pk),
        (E.ATTEMPT_ACCEPTED, second.pk),
        (E.ATTEMPT_STARTED, second.pk),
        (E.RUN_STARTED, None),
        (E.ATTEMPT_FINISHED, first.pk),
        (E.RUN_FINISHED, None),
        (E.ATTEMPT_FINISHED, third.pk),
        (E.ATTEMPT_FINISHED, second.pk),
    ]
    assert rows[9].data["status"] == "failed"
    assert rows[10].data == {"status": "cancelled", "reason": "cancelled: another shard failed"}
