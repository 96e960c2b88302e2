"""The run lifecycle, dispatch, liveness and the scheduler service, without sockets.

These run inside pytest-django's transaction, so on_commit hooks (the dispatch
wake-up after a trigger, frames to agents) do not fire: each test calls the
function it is about.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from django.db import connection, transaction
from django.utils import timezone

from tasks_app import lifecycle, logs, tokens
from tasks_app.exceptions import TaskDisabled
from tasks_app.lifecycle import Outcome, Result
from tasks_app.models import Attempt, LogChunk, Run, SchedulerState, Task
from tests import engines
from workers_app import dispatch, liveness
from workers_app.models import Worker
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db


# --- helpers -------------------------------------------------------------------


def make_worker(
    name: str,
    *,
    capacity: int = 2,
    labels: list[str] | None = None,
    state: str = Worker.State.ONLINE,
    **fields,
) -> Worker:
    fields.setdefault("last_heartbeat", timezone.now())
    return Worker.objects.create(
        name=name,
        capacity=capacity,
        labels=labels or [],
        state=state,
        credential_hash=tokens.digest(f"wkr_{name}"),
        **fields,
    )


def queue(task: Task, count: int = 1) -> list[Attempt]:
    return [lifecycle.trigger_run(task).attempts.get() for _ in range(count)]


def running_on(worker: Worker, task: Task) -> Attempt:
    (attempt,) = queue(task)
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1234)
    attempt.refresh_from_db()
    return attempt


def result(exit_code: int = 0, **fields) -> Result:
    now = timezone.now().timestamp()
    return Result(
        status="succeeded" if exit_code == 0 else "failed",
        exit_code=exit_code,
        reason="" if exit_code == 0 else f"exit code {exit_code}",
        started_at=now - 2,
        finished_at=now - 1,
        output_bytes=fields.pop("output_bytes", 0),
        **fields,
    )


def chunk(attempt_id: int, seq: int, stream: str, data: str) -> tuple:
    return (attempt_id, seq, stream, data)


def append(worker: Worker, chunks: list[tuple]) -> tuple[dict[int, int], set[int]]:
    """Store one worker's chunks; (attempt -> acked seq, refused attempts)."""
    done = logs.append_logs([logs.Chunk(worker.pk, *c) for c in chunks])
    assert {w for w, _ in [*done.acked, *done.refused]} <= {worker.pk}
    return {a: seq for (_, a), seq in done.acked.items()}, {a for _, a in done.refused}


@pytest.fixture
def online(worker) -> Worker:
    worker.state = Worker.State.ONLINE
    worker.last_heartbeat = timezone.now()
    worker.save()
    return worker


# --- triggering ----------------------------------------------------------------


def test_it_snapshots_the_task_when_a_run_is_triggered(task, bob):
    task.env = {"ANSWER": "42"}
    task.timeout = 30
    task.save()

    run = lifecycle.trigger_run(task, Run.Trigger.API, user=bob)
    task.command = "false"
    task.env = {}
    task.save()

    run.refresh_from_db()
    assert run.definition == {
        "command": 'python3 -c "print(6*7)"',
        "shell": False,
        "argv": ["python3", "-c", "print(6*7)"],
        "env": {"ANSWER": "42"},
        "secret_env": "",
        "working_dir": "",
        "timeout": 30,
        "labels": [],
        "max_retries": 0,
        "retry_backoff_s": 10.0,
        "retry_backoff_max_s": 600.0,
        "priority": 0,
        "strategy": "least_loaded",
        "pinned_worker": "",
        "shards": 1,
        "merge_command": "",
        "merge_argv": None,
    }
    assert (run.task_id, run.task_name, run.trigger) == (task.pk, "answer", "api")
    assert (run.status, run.created_by) == (Run.Status.QUEUED, bob)
    attempt = run.attempts.get()
    assert (attempt.status, attempt.shard_index, attempt.try_number) == ("queued", 0, 1)
    assert attempt.worker is None


def test_it_refuses_to_trigger_a_disabled_task(task):
    task.enabled = False
    task.save()

    with pytest.raises(TaskDisabled, match="^task 'answer' is disabled$"):
        lifecycle.trigger_run(task)

    assert not Run.objects.exists()
    assert not Attempt.objects.exists()


# --- the assignment handshake --------------------------------------------------


def test_it_assigns_an_attempt_only_once(task, worker):
    other = make_worker("node-2")
    (attempt,) = queue(task)

    assert lifecycle.assign(attempt.pk, worker.pk, worker.name) is True
    assert lifecycle.assign(attempt.pk, other.pk, other.name) is False

    attempt.refresh_from_db()
    assert (attempt.status, attempt.worker_id, attempt.worker_name) == (
        "assigned",
        worker.pk,
        "node-1",
    )
    assert attempt.assigned_at is not None


def test_it_lets_only_the_assigned_worker_accept_and_start_an_attempt(task, worker):
    other = make_worker("node-2")
    (attempt,) = queue(task)
    lifecycle.assign(attempt.pk, worker.pk, worker.name)

    assert lifecycle.mark_accepted(other.pk, attempt.pk) is False
    assert lifecycle.mark_started(other.pk, attempt.pk, None, 1) is False
    attempt.refresh_from_db()
    assert (attempt.status, attempt.accepted_at, attempt.pid) == ("assigned", None, None)

    assert lifecycle.mark_accepted(worker.pk, attempt.pk) is True
    attempt.refresh_from_db()
    agent_start = attempt.assigned_at + dt.timedelta(milliseconds=3)
    time.sleep(0.01)  # the start is reported after it happened
    assert lifecycle.mark_started(worker.pk, attempt.pk, agent_start.timestamp(), 321) is True
    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.RUNNING
    assert attempt.pid == 321
    assert attempt.started_at == agent_start
    run = Run.objects.get(pk=attempt.run_id)
    assert (run.status, run.started_at) == (Run.Status.RUNNING, attempt.started_at)
    # Started is a one-way step: a replayed frame changes nothing.
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 999) is False


@pytest.mark.parametrize("skew_s", [-3600, -0.5, 0, 0.5, 3600], ids=lambda s: f"agent{s:+}s")
def test_an_attempts_times_stay_in_order_whatever_the_agents_clock(task, worker, skew_s):
    (attempt,) = queue(task)
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    before = timezone.now()
    agent_now = time.time() + skew_s
    assert lifecycle.mark_started(worker.pk, attempt.pk, agent_now, 1)
    # The command ran 0.25 s by the agent's own clock, and was reported then.
    time.sleep(0.3)
    finished = Result("failed", 1, "exit code 1", agent_now, agent_now + 0.25)
    assert lifecycle.finish(worker.pk, attempt.pk, finished) is Outcome.STORED
    after = timezone.now()

    attempt.refresh_from_db()
    run = Run.objects.get(pk=attempt.run_id)
    assert attempt.queued_at <= attempt.assigned_at <= attempt.started_at
    assert attempt.started_at <= attempt.finished_at <= after
    assert run.started_at <= run.finished_at
    assert attempt.assigned_at >= before - dt.timedelta(seconds=5)
    # The length is the agent's, unless the master's clock says it cannot be
    # (an agent ahead of us: its start is held at now, its end too).
    if skew_s <= 0:
        assert attempt.duration == dt.timedelta(seconds=0.25)
    assert attempt.duration >= dt.timedelta(0)


def test_a_command_that_never_started_ends_no_earlier_than_it_started(task, worker):
    """A spawn failure reports no start, and an end by the agent's (here, slow) clock."""
    (attempt,) = queue(task)
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    spawn_failed = Result("failed", None, "command not found", None, time.time() - 0.003)

    assert lifecycle.finish(worker.pk, attempt.pk, spawn_failed) is Outcome.STORED

    attempt.refresh_from_db()
    run = Run.objects.get(pk=attempt.run_id)
    assert attempt.assigned_at <= attempt.started_at <= attempt.finished_at
    assert run.duration >= dt.timedelta(0)


def test_it_requeues_only_assignments_of_that_worker_that_did_not_start(task, worker):
    other = make_worker("node-2")
    mine, theirs, started = queue(task, 3)
    lifecycle.assign(mine.pk, worker.pk, worker.name)
    lifecycle.assign(theirs.pk, other.pk, other.name)
    lifecycle.assign(started.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, started.pk, None, 1)

    assert lifecycle.requeue(worker.pk, [mine.pk, theirs.pk, started.pk]) == [mine.pk]

    statuses = dict(Attempt.objects.values_list("pk", "status"))
    assert statuses == {mine.pk: "queued", theirs.pk: "assigned", started.pk: "running"}
    mine.refresh_from_db()
    assert (mine.worker_id, mine.assigned_at) == (None, None)


# --- results -------------------------------------------------------------------


def test_it_stores_a_result_once_and_reports_a_duplicate(task, worker):
    attempt = running_on(worker, task)
    first = result(3)

    assert lifecycle.finish(worker.pk, attempt.pk, first) is Outcome.STORED
    attempt.refresh_from_db()
    stored = (attempt.status, attempt.exit_code, attempt.reason, attempt.finished_at)
    assert stored[:3] == ("failed", 3, "exit code 3")
    assert attempt.started_at <= attempt.finished_at <= timezone.now()

    assert lifecycle.finish(worker.pk, attempt.pk, result(0)) is Outcome.DUPLICATE

    attempt.refresh_from_db()
    assert (attempt.status, attempt.exit_code, attempt.reason, attempt.finished_at) == stored
    run = Run.objects.get(pk=attempt.run_id)
    assert (run.status, run.reason) == (Run.Status.FAILED, "exit code 3 (after 1 attempt)")


def test_it_refuses_a_result_from_another_worker(task, worker):
    other = make_worker("node-2")
    attempt = running_on(worker, task)

    assert lifecycle.finish(other.pk, attempt.pk, result(0)) is Outcome.UNKNOWN
    assert lifecycle.finish(worker.pk, 987654, result(0)) is Outcome.UNKNOWN

    attempt.refresh_from_db()
    assert (attempt.status, attempt.exit_code, attempt.finished_at) == ("running", None, None)
    assert Run.objects.get(pk=attempt.run_id).status == Run.Status.RUNNING


def test_it_keeps_a_late_result_beside_the_masters_verdict(task, worker):
    attempt = running_on(worker, task)
    assert lifecycle.mark_lost(worker.pk, "worker lost: test") == [attempt.pk]

    assert lifecycle.finish(worker.pk, attempt.pk, result(0, output_bytes=5)) is Outcome.LATE
    assert lifecycle.finish(worker.pk, attempt.pk, result(1)) is Outcome.DUPLICATE

    attempt.refresh_from_db()
    assert (attempt.status, attempt.reason, attempt.exit_code) == (
        "lost",
        "worker lost: test",
        None,
    )
    assert (attempt.late_status, attempt.late_exit_code, attempt.late_reason) == (
        "succeeded",
        0,
        "",
    )
    assert attempt.output_bytes == 5
    assert Run.objects.get(pk=attempt.run_id).status == Run.Status.FAILED


def test_it_marks_active_attempts_lost_except_those_kept(task, worker):
    kept = running_on(worker, task)
    lost = running_on(worker, task)
    (queued,) = queue(task)

    assert lifecycle.mark_lost(worker.pk, "worker lost: gone", keep=[kept.pk]) == [lost.pk]

    statuses = dict(Attempt.objects.values_list("pk", "status"))
    assert statuses == {kept.pk: "running", lost.pk: "lost", queued.pk: "queued"}
    lost.refresh_from_db()
    assert (lost.reason, lost.closed_by_master) == ("worker lost: gone", True)


def test_it_retries_a_failed_attempt_after_a_backoff_until_retries_run_out(task, worker):
    task.max_retries = 1
    task.retry_backoff_s = 60
    task.save()
    first = running_on(worker, task)
    before = timezone.now()

    assert lifecycle.finish(worker.pk, first.pk, result(3)) is Outcome.STORED

    second = Attempt.objects.get(run_id=first.run_id, try_number=2)
    assert (second.status, second.shard_index, second.worker_id) == ("queued", 0, None)
    # Backoff 60s with jitter: between half and all of it.
    assert before + dt.timedelta(seconds=29) < second.not_before
    assert second.not_before < timezone.now() + dt.timedelta(seconds=61)
    assert Run.objects.get(pk=first.run_id).status == Run.Status.RUNNING

    assert lifecycle.assign(second.pk, worker.pk, worker.name)
    assert lifecycle.finish(worker.pk, second.pk, result(3)) is Outcome.STORED

    assert Attempt.objects.filter(run_id=first.run_id).count() == 2
    run = Run.objects.get(pk=first.run_id)
    assert (run.status, run.reason) == (Run.Status.FAILED, "exit code 3 (after 2 attempts)")


def test_it_computes_backoff_with_jitter_and_a_cap():
    for _ in range(50):
        assert 5 <= lifecycle.backoff_seconds(1, 10, 600) <= 10
        assert 20 <= lifecycle.backoff_seconds(3, 10, 600) <= 40
        assert 50 <= lifecycle.backoff_seconds(10, 10, 100) <= 100


# --- run status from attempts --------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "status", "reason"),
    [
        ([(0, 1, "succeeded"), (1, 1, "succeeded")], "succeeded", ""),
        (
            [(0, 1, "succeeded"), (1, 1, "failed")],
            "failed",
            "shard 1 of 2 failed: exit code 3 (after 1 attempt)",
        ),
        ([(0, 1, "succeeded"), (1, 1, "cancelled")], "cancelled", ""),
        ([(0, 1, "lost"), (0, 2, "succeeded")], "succeeded", ""),
        ([(0, 1, "succeeded"), (0, 2, "timed_out")], "failed", "exit code 3 (after 2 attempts)"),
        ([(0, 1, "running"), (1, 1, "queued")], "running", ""),
        ([(0, 1, "succeeded"), (1, 1, "assigned")], "running", ""),
        ([(0, 1, "queued"), (1, 1, "assigned")], "queued", ""),
    ],
    ids=[
        "all-succeeded",
        "one-failed",
        "one-cancelled",
        "latest-try-counts",
        "latest-try-failed",
        "one-running",
        "one-done-one-assigned",
        "none-started",
    ],
)
def test_it_aggregates_a_runs_status_from_the_latest_try_of_each_shard(
    task, attempts, status, reason
):
    task.shards = len({shard for shard, *_ in attempts})
    task.save()
    run = lifecycle.trigger_run(task)
    run.attempts.all().delete()
    for shard, try_number, attempt_status in attempts:
        final = attempt_status in Attempt.FINAL
        Attempt.objects.create(
            run=run,
            shard_index=shard,
            try_number=try_number,
            status=attempt_status,
            reason="" if attempt_status == "succeeded" else "exit code 3",
            started_at=timezone.now() if attempt_status != "queued" else None,
            finished_at=timezone.now() if final else None,
        )

    lifecycle.refresh_runs([run.pk])

    run.refresh_from_db()
    assert (run.status, run.reason) == (status, reason)
    assert (run.finished_at is not None) == (status in Run.FINAL)


def test_it_never_changes_a_finished_run_again(task, worker):
    attempt = running_on(worker, task)
    lifecycle.finish(worker.pk, attempt.pk, result(0))
    finished_at = Run.objects.get(pk=attempt.run_id).finished_at
    Attempt.objects.filter(pk=attempt.pk).update(status=Attempt.Status.FAILED)

    lifecycle.refresh_runs([attempt.run_id])

    run = Run.objects.get(pk=attempt.run_id)
    assert (run.status, run.finished_at) == (Run.Status.SUCCEEDED, finished_at)


# --- output --------------------------------------------------------------------


def test_it_stores_output_in_seq_order_and_acks_the_highest_seq(task, worker):
    attempt = running_on(worker, task)
    chunks = [
        chunk(attempt.pk, 1, "stderr", "oops\n"),
        chunk(attempt.pk, 0, "stdout", "42\n"),
        chunk(attempt.pk, 2, "stdout", "done\n"),
    ]

    assert append(worker, chunks) == ({attempt.pk: 2}, set())

    attempt.refresh_from_db()
    assert (attempt.stored_bytes, attempt.truncated) == (13, False)
    assert logs.output_of(attempt) == {
        "stdout": "42\ndone\n",
        "stderr": "oops\n",
        "combined": "42\noops\ndone\n",
    }


def test_a_nul_in_output_is_kept_on_sqlite_and_replaced_on_postgresql(task, worker):
    # PostgreSQL text cannot hold NUL: storing it as printed would fail the whole
    # batch, the frames of other attempts in it included.
    attempt = running_on(worker, task)
    other = running_on(worker, task)

    assert append(
        worker, [chunk(attempt.pk, 0, "stdout", "a\x00b\n"), chunk(other.pk, 0, "stdout", "ok\n")]
    ) == (
        {attempt.pk: 0, other.pk: 0},
        set(),
    )

    attempt.refresh_from_db()
    expected = "a\x00b\n" if connection.vendor == "sqlite" else "a\ufffdb\n"
    assert logs.output_of(attempt)["stdout"] == expected
    assert attempt.stored_bytes == len(expected.encode())
    assert logs.output_of(Attempt.objects.get(pk=other.pk))["stdout"] == "ok\n"


def test_it_ignores_replayed_output(task, worker):
    attempt = running_on(worker, task)
    batch = [chunk(attempt.pk, 0, "stdout", "hello\n"), chunk(attempt.pk, 1, "stdout", "bye\n")]
    append(worker, batch)

    # After a reconnect the agent sends what it was not sure of again, with
    # a repeat inside the same batch too.
    replay = [
        *batch,
        chunk(attempt.pk, 2, "stdout", "new\n"),
        chunk(attempt.pk, 2, "stdout", "new\n"),
    ]
    assert append(worker, replay) == ({attempt.pk: 2}, set())

    assert list(attempt.log_chunks.values_list("seq", "data")) == [
        (0, "hello\n"),
        (1, "bye\n"),
        (2, "new\n"),
    ]
    attempt.refresh_from_db()
    assert attempt.stored_bytes == len("hello\nbye\nnew\n")


def test_it_refuses_output_for_attempts_the_worker_does_not_run(task, worker):
    other = make_worker("node-2")
    theirs = running_on(other, task)
    finished = running_on(worker, task)
    lifecycle.finish(worker.pk, finished.pk, result(0))
    mine = running_on(worker, task)
    chunks = [
        chunk(theirs.pk, 0, "stdout", "forged\n"),
        chunk(finished.pk, 5, "stdout", "too late\n"),
        chunk(987654, 0, "stdout", "nobody\n"),
        chunk(mine.pk, 0, "stdout", "fine\n"),
    ]

    acked, refused = append(worker, chunks)

    assert (acked, refused) == ({mine.pk: 0}, {theirs.pk, finished.pk, 987654})
    assert list(LogChunk.objects.values_list("attempt_id", "data")) == [(mine.pk, "fine\n")]
    theirs.refresh_from_db()
    assert theirs.stored_bytes == 0


def test_it_caps_output_and_marks_it_truncated(settings, task, worker):
    settings.SCHEDULER_LOG_LIMIT_BYTES = 10
    attempt = running_on(worker, task)

    append(worker, [chunk(attempt.pk, 0, "stdout", "hello world\n")])
    append(worker, [chunk(attempt.pk, 1, "stderr", "more\n")])
    lifecycle.finish(worker.pk, attempt.pk, result(0, output_bytes=17))

    attempt.refresh_from_db()
    assert (attempt.stored_bytes, attempt.output_bytes, attempt.truncated) == (10, 17, True)
    assert list(attempt.log_chunks.values_list("seq", "data")) == [(0, "hello worl")]
    output = logs.output_of(attempt)
    assert output["stdout"] == "hello worl\n[output truncated: kept 10 of 17 bytes]\n"
    assert output["stderr"] == "\n[output truncated: kept 10 of 17 bytes]\n"


def test_it_never_cuts_a_character_in_half_at_the_cap(settings, task, worker):
    settings.SCHEDULER_LOG_LIMIT_BYTES = 5
    attempt = running_on(worker, task)

    append(worker, [chunk(attempt.pk, 0, "stdout", "ééé")])

    attempt.refresh_from_db()
    assert list(attempt.log_chunks.values_list("data", flat=True)) == ["éé"]
    assert (attempt.stored_bytes, attempt.truncated) == (4, True)


# --- dispatch ------------------------------------------------------------------


def test_it_dispatches_within_capacity_and_labels_across_workers(task):
    plain = make_worker("plain", capacity=2, labels=["linux"])
    gpu = make_worker("gpu", capacity=2, labels=["linux", "gpu"])
    gpu_task = Task.objects.create(name="train", command="train.sh", labels=["gpu"])
    attempts = []
    for _ in range(5):
        attempts += queue(gpu_task) + queue(task)
    g1, p1, g2, p2 = attempts[:4]

    assigned = dispatch.dispatch()

    assert assigned == [(gpu.pk, g1.pk), (plain.pk, p1.pk), (gpu.pk, g2.pk), (plain.pk, p2.pk)]
    assert dict(
        Attempt.objects.filter(status=Attempt.Status.ASSIGNED).values_list("pk", "worker_id")
    ) == {g1.pk: gpu.pk, p1.pk: plain.pk, g2.pk: gpu.pk, p2.pk: plain.pk}
    assert Attempt.objects.filter(status=Attempt.Status.QUEUED, worker=None).count() == 6
    # Everything is full now: a second pass finds no slot.
    assert dispatch.dispatch() == []


def test_it_counts_running_attempts_against_capacity(task):
    node = make_worker("node", capacity=2)
    running_on(node, task)
    first, second = queue(task, 2)

    assert dispatch.dispatch() == [(node.pk, first.pk)]
    second.refresh_from_db()
    assert second.status == Attempt.Status.QUEUED


def test_it_gives_work_to_the_least_loaded_worker(task):
    big = make_worker("big", capacity=4)
    small = make_worker("small", capacity=2)
    running_on(big, task)  # big: 1 of 4 in use, small: 0 of 2
    a1, a2, a3 = queue(task, 3)

    assert dispatch.dispatch() == [
        (small.pk, a1.pk),  # 0/2 beats 1/4
        (big.pk, a2.pk),  # 1/4 beats 1/2
        (big.pk, a3.pk),  # 2/4 ties 1/2: the older worker
    ]


def test_it_does_not_dispatch_to_workers_that_cannot_take_work(task):
    make_worker("offline", state=Worker.State.OFFLINE)
    make_worker("draining", state=Worker.State.DRAINING)
    make_worker("disabled", state=Worker.State.DISABLED)
    make_worker("revoked", revoked_at=timezone.now())
    make_worker("no-linux", labels=["windows"])
    task.labels = ["linux"]
    task.save()
    (attempt,) = queue(task)

    assert dispatch.dispatch() == []

    attempt.refresh_from_db()
    assert (attempt.status, attempt.worker_id) == ("queued", None)


def test_it_holds_a_retry_until_its_backoff_has_passed(task):
    node = make_worker("node")
    (attempt,) = queue(task)
    Attempt.objects.filter(pk=attempt.pk).update(ready_at=timezone.now() + dt.timedelta(seconds=30))

    assert dispatch.dispatch() == []

    Attempt.objects.filter(pk=attempt.pk).update(ready_at=timezone.now() - dt.timedelta(seconds=1))
    assert dispatch.dispatch() == [(node.pk, attempt.pk)]


def test_it_dispatches_nothing_while_the_scheduler_is_paused(task):
    node = make_worker("node")
    (attempt,) = queue(task)
    SchedulerState.set_paused(True, by="alice")

    assert dispatch.dispatch() == []

    SchedulerState.set_paused(False)
    assert dispatch.dispatch() == [(node.pk, attempt.pk)]


def test_it_builds_assign_frames_for_attempts_assigned_but_not_started(task, worker):
    started = running_on(worker, task)
    (waiting,) = queue(task)
    lifecycle.assign(waiting.pk, worker.pk, worker.name)

    assert dispatch.assigned_frames([worker.pk]).get(worker.pk, []) == [
        {
            "type": "assign",
            "attempt": waiting.pk,
            "run": waiting.run_id,
            "task_name": "answer",
            "argv": ["python3", "-c", "print(6*7)"],
            "shell": None,
            "env": {},
            "cwd": None,
            "timeout": None,
            "shard_index": 0,
            "shard_count": 1,
        }
    ]
    assert started.pk not in [
        f["attempt"] for f in dispatch.assigned_frames([worker.pk]).get(worker.pk, [])
    ]


# --- liveness ------------------------------------------------------------------


@pytest.fixture
def lost_after(settings) -> dt.timedelta:
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    return dt.timedelta(seconds=15)


def test_it_reaps_a_silent_worker_and_loses_its_attempts(task, online, lost_after):
    attempt = running_on(online, task)
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - lost_after - dt.timedelta(seconds=1)
    )

    assert liveness.reap_lost() == [online.pk]

    online.refresh_from_db()
    assert online.state == Worker.State.OFFLINE
    attempt.refresh_from_db()
    assert (attempt.status, attempt.reason) == ("lost", "worker lost: no heartbeat for 15s")
    assert attempt.finished_at is not None
    assert Run.objects.get(pk=attempt.run_id).status == Run.Status.FAILED
    # Reaping again finds nothing left to do.
    assert liveness.reap_lost() == []


def test_it_reaps_a_worker_that_never_heartbeated_after_the_grace(task, lost_after):
    old = timezone.now() - lost_after - dt.timedelta(minutes=1)
    silent = make_worker("silent", last_heartbeat=None, created_at=old)
    attempt = running_on(silent, task)

    assert liveness.reap_lost() == [silent.pk]

    silent.refresh_from_db()
    assert silent.state == Worker.State.OFFLINE
    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.LOST


def test_it_leaves_a_worker_alone_while_it_heartbeats(task, online, lost_after):
    running_on(online, task)
    young = make_worker("young", last_heartbeat=None)
    running_on(young, task)
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - lost_after + dt.timedelta(seconds=2)
    )

    assert liveness.reap_lost() == []

    assert set(Worker.objects.values_list("state", flat=True)) == {Worker.State.ONLINE}
    assert set(Attempt.objects.values_list("status", flat=True)) == {Attempt.Status.RUNNING}


def test_it_judges_silence_at_the_time_it_is_given(task, online, lost_after):
    attempt = running_on(online, task)

    assert liveness.reap_lost(now=timezone.now() + lost_after - dt.timedelta(seconds=1)) == []
    assert liveness.reap_lost(now=timezone.now() + lost_after + dt.timedelta(seconds=1)) == [
        online.pk
    ]

    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.LOST


def test_it_loses_the_attempts_of_a_silent_disabled_worker_but_keeps_it_disabled(
    task, online, lost_after
):
    attempt = running_on(online, task)
    Worker.objects.filter(pk=online.pk).update(
        state=Worker.State.DISABLED,
        last_heartbeat=timezone.now() - lost_after - dt.timedelta(seconds=1),
    )

    assert liveness.reap_lost() == [online.pk]

    online.refresh_from_db()
    assert online.state == Worker.State.DISABLED
    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.LOST


def test_it_retries_the_attempts_of_a_lost_worker(task, online, lost_after):
    task.max_retries = 2
    task.save()
    attempt = running_on(online, task)

    liveness.reap_lost(now=timezone.now() + lost_after + dt.timedelta(seconds=1))

    retry = Attempt.objects.get(run_id=attempt.run_id, try_number=2)
    assert (retry.status, retry.worker_id) == ("queued", None)
    assert retry.not_before is not None
    assert Run.objects.get(pk=attempt.run_id).status == Run.Status.RUNNING


# --- the scheduler service -----------------------------------------------------


def test_it_does_not_reap_during_its_own_first_grace_period(task, online, lost_after):
    attempt = running_on(online, task)
    Worker.objects.filter(pk=online.pk).update(
        last_heartbeat=timezone.now() - lost_after - dt.timedelta(minutes=5)
    )
    service = SchedulerService()

    # The server was down itself: every worker looks silent right after its start.
    assert service.reap_lost_workers() is False
    online.refresh_from_db()
    assert online.state == Worker.State.ONLINE
    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.RUNNING

    service.alive_since = time.monotonic() - lost_after.total_seconds() - 1
    assert service.reap_lost_workers() is True
    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.LOST


def test_its_tick_says_whether_it_found_work(task, online):
    service = SchedulerService()

    assert service.tick() is False

    (attempt,) = queue(task)
    assert service.tick() is True
    attempt.refresh_from_db()
    assert (attempt.status, attempt.worker_id) == ("assigned", online.pk)
    assert service.tick() is False


def test_its_tick_keeps_going_when_one_duty_fails(task, online, monkeypatch, caplog):
    service = SchedulerService()
    service.alive_since -= 3600

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "reap_lost_workers", broken)
    (attempt,) = queue(task)

    assert service.tick() is True

    attempt.refresh_from_db()
    assert attempt.status == Attempt.Status.ASSIGNED
    assert "scheduler duty broken failed" in caplog.text


# --- cost of a dispatch pass ----------------------------------------------------------


def _dispatch_queries() -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        dispatch.dispatch(fresh=False)
    # (The savepoints are the test's transaction, not the pass.)
    return [q["sql"] for q in captured.captured_queries if "SAVEPOINT" not in q["sql"]]


def test_a_dispatch_pass_costs_the_slots_it_fills_not_the_queue_length(task):
    from django.db import connection

    node = make_worker("node", capacity=2)
    lifecycle.trigger_runs([lifecycle.TriggerRequest(task.pk, count=10)])
    dispatch.dispatch()  # builds the board, fills both slots
    busy = list(Attempt.objects.filter(status="assigned").values_list("pk", flat=True))
    lifecycle.finish(node.pk, busy[0], result(0))
    dispatch.board.mark([node.pk])
    small = _dispatch_queries()

    for _ in range(10):
        lifecycle.trigger_runs([lifecycle.TriggerRequest(task.pk, count=1000)])
    lifecycle.finish(node.pk, busy[1], result(0))
    dispatch.board.mark([node.pk])
    large = _dispatch_queries()

    # The same statements, 10 or 10,000 queued; the queue read is LIMITed to the
    # free slots and walks the queue index, never the table.
    assert len(large) == len(small)
    [read] = [q for q in large if 'FROM "tasks_app_attempt"' in q and "LIMIT 1" in q]
    with connection.cursor() as cursor:
        plan = engines.query_plan(cursor, read)
    assert "attempt_queue" in plan and engines.SORT_STEP[connection.vendor] not in plan, plan
    assert Attempt.objects.filter(status="assigned").count() == 2


def test_an_idle_dispatch_pass_reads_nothing(task):
    make_worker("node", capacity=2)
    dispatch.dispatch()  # nothing queued: the board knows of no queued label set

    assert _dispatch_queries() == []


def test_a_dispatcher_with_a_stale_view_of_the_slots_never_overfills_a_worker(task, monkeypatch):
    node = make_worker("node", capacity=2)
    queue(task, 5)
    # Another server process's board: built while the worker was still empty.
    theirs = dispatch.Board()
    with transaction.atomic():
        theirs.refresh()
    assert theirs.workers[node.pk].free == 2

    assert len(dispatch.dispatch()) == 2  # ours fills both slots
    monkeypatch.setattr(dispatch, "board", theirs)

    # It believes in two free slots; the database counts none, and it learns that.
    assert dispatch.dispatch(fresh=False) == []
    assert Attempt.objects.filter(worker=node, status__in=Attempt.ACTIVE).count() == 2
    assert dispatch.dispatch(fresh=False) == []
    assert theirs.workers[node.pk].free == 0
