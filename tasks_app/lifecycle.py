"""The run lifecycle: trigger, claim, accept, start, finish, lose, retry, cancel.

Transitions only (output is tasks_app.logs, the pause switch is
SchedulerState). Each takes many events at once: the server's writer applies
whatever accumulated in one transaction, so a batch of results costs a handful
of statements whatever its size; single-event forms wrap the batch ones.

Every transition has exactly one winner. A function that reads rows before it
moves them does so inside its transaction under a lock: on SQLite the
transaction is IMMEDIATE (the database's write lock is held from BEGIN), on
PostgreSQL `_locked()` adds SELECT ... FOR UPDATE; and every UPDATE still
names the state it expects, so a row that moved meanwhile is left alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from tasks_app import events, metrics, secret_env, shards
from tasks_app.batchsql import (
    atomic,
    aware,
    column,
    for_update,
    insert_rows,
    json_value,
    marks,
    select,
    table,
    update_rows,
)
from tasks_app.events import Row
from tasks_app.exceptions import (
    RunNotCancellable,
    RunNotRetryable,
    RunTooLarge,
    SecretsUnreadable,
    TaskDisabled,
    TaskError,
    TaskNotFound,
)
from tasks_app.models import (
    HELD_UNTIL,
    TASK_FIELDS,
    Attempt,
    Run,
    Strategy,
    Task,
    pin_label,
    queue_at,
)
from tasks_app.routing import Routes, Unroutable
from tasks_app.signals import stop_requested, work_queued
from tasks_app.validators import check_run_size

ACTIVE = Attempt.ACTIVE
FINAL_ATTEMPT = Attempt.FINAL
RETRYABLE = (Attempt.Status.FAILED, Attempt.Status.TIMED_OUT, Attempt.Status.LOST)
S = Attempt.Status

Pair = tuple[int, int]  # (worker id, attempt id)
# Raw SQL on the hottest reads (see tasks_app.batchsql); column names are the
# fields' names there.
ATTEMPT, RUN = table(Attempt), table(Run)


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value, tz=dt.UTC)


def _locked(queryset: QuerySet) -> QuerySet:
    """Lock the rows until commit where the database has row locks (see the module doc)."""
    if connection.features.has_select_for_update:
        return queryset.select_for_update(of=("self",))
    return queryset


def _wake_dispatch(labels_keys: Iterable[str] | None = None) -> None:
    """After commit: attempts of these label sets (None: any) may be dispatched."""
    keys = None if labels_keys is None else set(labels_keys)
    transaction.on_commit(lambda: work_queued.send(sender=Run, labels_keys=keys), robust=True)


def _stop(attempts: list[Pair]) -> None:
    """Tell the agents running these (worker id, attempt id) pairs to kill them."""
    if attempts:
        transaction.on_commit(
            lambda: stop_requested.send(sender=Attempt, attempts=attempts), robust=True
        )


# --- triggering ----------------------------------------------------------------


@dataclass(frozen=True)
class TriggerRequest:
    """Start `count` runs of a task, or one run per entry of `params`."""

    task_id: int
    trigger: str = Run.Trigger.MANUAL
    user_id: int | None = None
    count: int = 1
    # Each {"env": {...}, "args": [...]}, already validated (tasks_app.params).
    params: tuple[dict, ...] | None = None
    # The cron tick this run is for: a tick that has its run already (another
    # server process fired it) gets none, and its result is an empty list.
    scheduled_for: dt.datetime | None = None
    # A delayed run: its first attempt is ready at this time, not before
    # (validated: tasks_app.validators.clean_run_at).
    run_at: dt.datetime | None = None


def trigger_runs(requests: Sequence[TriggerRequest]) -> list[list[Run] | TaskError]:
    """Create the runs of many requests in one transaction: per request, its
    runs (each with its first attempt, queued) or the error that refused it."""
    with atomic():
        tasks = _tasks({r.task_id for r in requests})
        limits = _Limits([t for t in tasks.values() if t.concurrency_limit])
        results: list[list[Run] | TaskError] = []
        runs: list[Run] = []
        for request in requests:
            task = tasks.get(request.task_id)
            if task is None:
                results.append(TaskNotFound(f"no task with id {request.task_id}"))
                continue
            if not task.enabled:
                results.append(TaskDisabled(f"task {task.name!r} is disabled"))
                continue
            plain = None  # one snapshot shared by every run without parameters
            batch = []
            try:
                definitions = []
                for params in request.params or [{}] * request.count:
                    if params:
                        definition = task.definition(params)
                        check_run_size(definition)
                    else:
                        if plain is None:
                            plain = task.definition()
                            check_run_size(plain)
                        definition = plain
                    definitions.append((params, definition))
            except ValidationError as exc:
                results.append(RunTooLarge(exc.messages[0]))
                continue
            for params, definition in definitions:
                batch.append(
                    Run(
                        task=task,
                        task_name=task.name,
                        definition=definition,
                        trigger=request.trigger,
                        created_by_id=request.user_id,
                        params=params,
                        scheduled_for=request.scheduled_for,
                        run_at=request.run_at,
                    )
                )
            for run in batch:
                limits.admit(task, run)
            runs += batch
            results.append(batch)
        created = _queue(runs)
        limits.after_insert()
    if len(created) < len(runs):
        results = [r if isinstance(r, TaskError) else [x for x in r if x.pk] for r in results]
    return results


class _Limits:
    """Concurrency limits of the tasks of one trigger batch (tasks with a limit only).

    A run of a task occupies the limit while it runs, or while it is queued
    and dispatchable (its attempt ready now, or assigned). Delayed runs not
    yet due and runs held back by the limit do not count.

    Race: two triggers of the same task at once must not both pass the
    limit. Both are counted and inserted in the writer's one transaction
    (IMMEDIATE on SQLite, so a second server process waits for it; on
    PostgreSQL the task rows are locked FOR UPDATE first, as the release path
    in refresh_runs does), and runs of one batch are counted as they are admitted.
    """

    def __init__(self, tasks: list[Task]) -> None:
        self.now = timezone.now()
        self.occupying: dict[int, list] = {}  # task id -> [Run (or id), ...], oldest first
        self.held: dict[int, int] = {}  # task id -> runs already held back
        self.skipped: list[tuple] = []  # (run, the run it met, its status, the limit)
        self.replaced: list[tuple[Run, list]] = []
        if tasks:
            ids = [t.pk for t in tasks]
            _lock_tasks(ids)
            for task_id, run_id, status in _occupying(ids, self.now):
                self.occupying.setdefault(task_id, []).append((run_id, status))
            self.held = _held_counts(ids)

    def admit(self, task: Task, run: Run) -> None:
        """Decide the fate of a new run of the task: through, held, skipped or replacing."""
        limit = task.concurrency_limit
        if not limit or run.run_at is not None:
            # A delayed run is not checked when it is due (a known gap, in the README).
            return
        busy = self.occupying.setdefault(task.pk, [])
        waiting = self.held.get(task.pk, 0)
        policy = task.busy_policy
        if len(busy) < limit and not (policy == Task.BusyPolicy.QUEUE and waiting):
            busy.append((run, Run.Status.QUEUED))
            return
        if policy == Task.BusyPolicy.SKIP:
            run.status = Run.Status.SKIPPED
            run.finished_at = self.now
            blocker, status = busy[-1]
            self.skipped.append((run, blocker, status, limit))
        elif policy == Task.BusyPolicy.REPLACE:
            self.replaced.append((run, [b for b, _ in busy]))
            busy[:] = [(run, Run.Status.QUEUED)]
        else:
            # FIFO behind those already waiting: held until a run of the task ends.
            run.held = True
            self.held[task.pk] = waiting + 1

    def after_insert(self) -> None:
        """Now that the new runs have ids: the skipped ones' reasons, the replacements' cancels.

        A run without an id was not inserted (a cron tick another process
        fired first): it skips and replaces nothing.
        """
        self.skipped = [entry for entry in self.skipped if entry[0].pk]
        # Nor does one that failed at once (nowhere to route it): it never
        # runs, so it must not stop the run it would have replaced.
        self.replaced = [
            entry for entry in self.replaced if entry[0].pk and entry[0].status == Run.Status.QUEUED
        ]
        for run, blocker, status, limit in self.skipped:
            run.reason = f"skipped: run #{_pk(blocker)} still {status} (limit {limit})"
        update_rows(Run, {"reason": "%s"}, [(run.reason, run.pk) for run, *_ in self.skipped])
        events.record_many(
            Row(events.RUN_FINISHED, run.pk, task_id=run.task_id, data=_finished(run))
            for run, *_ in self.skipped
        )
        for run, victims in self.replaced:
            for victim in victims:
                # It may have ended meanwhile: then there is nothing to replace.
                with contextlib.suppress(RunNotCancellable):
                    cancel_run(Run(pk=_pk(victim)), by=f"replace by run #{run.pk}")


def _pk(run) -> int:
    return run if isinstance(run, int) else run.pk


def _lock_tasks(task_ids: list[int]) -> None:
    """Hold these tasks' rows until commit where the database has row locks
    (on SQLite the transaction already holds the write lock)."""
    if connection.features.has_select_for_update:
        ids = sorted(task_ids)
        select(f"SELECT id FROM {table(Task)} WHERE id IN ({marks(ids)}) FOR UPDATE", ids)


def _occupying(task_ids: list[int], now: dt.datetime) -> list[tuple[int, int, str]]:
    """(task id, run id, status) of the runs that count against these tasks'
    limits, oldest first: running, or queued with an attempt ready or assigned."""
    ready = connection.ops.adapt_datetimefield_value(now)
    return select(
        f"SELECT r.task_id, r.id, r.status FROM {RUN} r WHERE r.task_id IN ({marks(task_ids)})"
        " AND (r.status = %s OR (r.status = %s AND EXISTS (SELECT 1 FROM"
        f" {ATTEMPT} a WHERE a.run_id = r.id AND (a.status IN (%s, %s)"
        " OR (a.status = %s AND a.ready_at <= %s))))) ORDER BY r.id",
        [*task_ids, Run.Status.RUNNING, Run.Status.QUEUED, *ACTIVE, S.QUEUED, ready],
    )


def _held_counts(task_ids: list[int]) -> dict[int, int]:
    held = connection.ops.adapt_datetimefield_value(HELD_UNTIL)
    return dict(
        select(
            f"SELECT r.task_id, COUNT(DISTINCT r.id) FROM {ATTEMPT} a"
            f" JOIN {RUN} r ON r.id = a.run_id"
            f" WHERE r.task_id IN ({marks(task_ids)}) AND a.status = %s AND a.ready_at = %s"
            " GROUP BY r.task_id",
            [*task_ids, S.QUEUED, held],
        )
    )


def _release_held(run_ids: list[int]) -> None:
    """Runs of these ended: for their tasks with a limit, let the oldest held
    runs go, as many as the limit now has room for (in the same transaction
    that ended them, under the same task lock as a trigger's check)."""
    rows = select(
        f"SELECT DISTINCT t.id, t.concurrency_limit FROM {RUN} r JOIN {table(Task)} t"
        f" ON t.id = r.task_id WHERE r.id IN ({marks(run_ids)}) AND t.concurrency_limit > 0",
        run_ids,
    )
    if rows:
        _release_held_of(dict(rows))


def release_held_runs(task_id: int) -> None:
    """The task's limit changed: let held runs go as far as the new limit has
    room (all of them when it has no limit any more)."""
    with atomic():
        limit = Task.objects.filter(pk=task_id).values_list("concurrency_limit", flat=True).first()
        if limit:
            _release_held_of({task_id: limit})
            return
        # Race: a trigger holding a run at this moment waits for our lock
        # (the write lock on SQLite, the task's row lock below on PostgreSQL).
        _lock_tasks([task_id])
        released = list(
            Attempt.objects.filter(
                run__task_id=task_id, status=S.QUEUED, ready_at=HELD_UNTIL
            ).values_list("pk", "labels_key", "priority")
        )
        _let_go(released, timezone.now())


def _release_held_of(limits: dict[int, int]) -> None:
    """Let the oldest held runs of these tasks (id -> limit) go, as many as
    each limit has room for."""
    _lock_tasks(list(limits))
    now = timezone.now()
    busy: dict[int, int] = {}
    for task_id, _, _ in _occupying(list(limits), now):
        busy[task_id] = busy.get(task_id, 0) + 1
    released: list[tuple[int, str, int]] = []
    held = connection.ops.adapt_datetimefield_value(HELD_UNTIL)
    for task_id, limit in limits.items():
        room = limit - busy.get(task_id, 0)
        if room <= 0:
            continue
        # The limit counts runs: a run held with several attempts (a
        # broadcast's shards) is released whole.
        run_ids = [
            pk
            for (pk,) in select(
                f"SELECT DISTINCT a.run_id FROM {ATTEMPT} a JOIN {RUN} r ON r.id = a.run_id"
                " WHERE r.task_id = %s AND a.status = %s AND a.ready_at = %s"
                " ORDER BY a.run_id LIMIT %s",
                [task_id, S.QUEUED, held, room],
            )
        ]
        if run_ids:
            released += select(
                f"SELECT id, labels_key, priority FROM {ATTEMPT} WHERE run_id IN"
                f" ({marks(run_ids)}) AND status = %s AND ready_at = %s",
                [*run_ids, S.QUEUED, held],
            )
    _let_go(released, now)


def _let_go(released: list[tuple[int, str, int]], now: dt.datetime) -> None:
    """These held attempts (id, labels key, priority) are ready now; their
    queue_at keeps their priority's head start (one UPDATE per priority)."""
    by_priority: dict[int, list[int]] = {}
    for pk, _, priority in released:
        by_priority.setdefault(priority, []).append(pk)
    for priority, ids in by_priority.items():
        # Race: a cancel of a held run at the same moment; only rows still held move.
        Attempt.objects.filter(pk__in=ids, status=S.QUEUED, ready_at=HELD_UNTIL).update(
            ready_at=now, queue_at=queue_at(now, priority)
        )
    if released:
        _wake_dispatch({key for _, key, _ in released})


def _tasks(ids: set[int]) -> dict[int, Task]:
    """Tasks by id, with the fields a run is made of (one raw read per batch)."""
    if not ids:
        return {}
    # secret_env is not one of the fields people set, but a run's snapshot keeps it.
    names = [*TASK_FIELDS, "secret_env"]
    rows = select(
        f"SELECT id, {', '.join(column(Task, n) for n in names)} FROM {table(Task)}"
        f" WHERE id IN ({marks(ids)})",
        list(ids),
    )
    tasks = {}
    for pk, *values in rows:
        task = Task(pk=pk, **dict(zip(names, values, strict=True)))
        task.env, task.labels = json_value(task.env), json_value(task.labels)
        tasks[pk] = task
    return tasks


def trigger_run(task: Task, trigger: str = Run.Trigger.MANUAL, user=None) -> Run:
    """Create one run with a snapshot of the task and queue its first attempt."""
    user_id = user.pk if user is not None and user.is_authenticated else None
    [result] = trigger_runs([TriggerRequest(task.pk, trigger, user_id)])
    if isinstance(result, TaskError):
        raise result
    return result[0]


def retry_run(run: Run, user=None) -> Run:
    """A new run of exactly what a finished run ran (its snapshot), linked to it."""
    result = retry_runs([run], user=user)[run.pk]
    if isinstance(result, RunNotRetryable):
        raise result
    return result


def retry_runs(runs: Sequence[Run], user=None) -> dict[int, Run | RunNotRetryable]:
    """Retry many finished runs in one transaction: per run id, its new run, or
    why it was not retried (not finished yet, its secrets unreadable).

    One read of the tasks and one insert of the runs and of their attempts for
    the whole batch; each retry meets its task's concurrency limit like any
    trigger (several retries of one task are admitted in order).
    """
    results: dict[int, Run | RunNotRetryable] = {}
    retries: list[Run] = []
    created_by = user if user is not None and user.is_authenticated else None
    for run in runs:
        if not run.is_final:
            results[run.pk] = RunNotRetryable(
                f"run {run.pk} is {run.status}; only a finished run can be retried"
            )
            continue
        try:
            # As Task.definition does for a trigger: a retry its agent could not be
            # given the secrets of would only fail at dispatch.
            secret_env.decrypt(run.definition.get("secret_env") or "")
        except SecretsUnreadable as exc:
            results[run.pk] = RunNotRetryable(f"run {run.pk} cannot be retried: {exc}")
            continue
        retry = Run(
            task_id=run.task_id,
            task_name=run.task_name,
            definition=run.definition,
            params=run.params,
            trigger=Run.Trigger.RETRY,
            retry_of=run,
            created_by=created_by,
        )
        results[run.pk] = retry
        retries.append(retry)
    if not retries:
        return results
    with atomic():
        # A retry is a new run of the task: it meets the task's limit like any other.
        tasks = _tasks({r.task_id for r in retries if r.task_id})
        limits = _Limits([t for t in tasks.values() if t.concurrency_limit])
        for retry in retries:
            task = tasks.get(retry.task_id)
            if task is not None:
                limits.admit(task, retry)
        _queue(retries)
        limits.after_insert()
        events.record_many(
            Row(events.RUN_RETRIED, r.retry_of_id, task_id=r.task_id, data={"new_run_id": r.pk})
            for r in retries
        )
    return results


def _queue(runs: list[Run]) -> list[Run]:
    """Insert runs and their first attempts (each run's `queued_attempts`);
    dispatch looks at them after commit. The runs inserted: a cron tick's run
    that exists already is left out (see below)."""
    if not runs:
        return []
    fields = (
        "task",
        "task_name",
        "definition",
        "trigger",
        "created_by",
        "retry_of",
        "params",
        "created_at",
        "scheduled_for",
        "run_at",
        "status",
        "finished_at",
        "reason",
    )
    _route(runs)
    rows = [
        (r.task_id, r.task_name, r.definition, r.trigger, r.created_by_id, r.retry_of_id)
        + (r.params, r.created_at, r.scheduled_for, r.run_at, r.status, r.finished_at, r.reason)
        for r in runs
    ]
    ticks = [r for r in runs if r.scheduled_for is not None]
    if ticks:
        # Race: several server processes fire the same cron tick. The unique
        # (task, scheduled_for) index lets one insert win; the others insert
        # nothing and go on. One tick per task per call, so the task tells
        # the inserted rows apart.
        if len(ticks) != len(runs) or len({r.task_id for r in runs}) != len(runs):
            raise ValueError("cron ticks are queued alone, one per task")
        ids = insert_rows(Run, fields, rows, skip_conflicts_by="task")
        runs = [run for run, pk in zip(runs, ids, strict=True) if pk is not None]
        ids = [pk for pk in ids if pk is not None]
        if not runs:
            return []
    else:
        ids = insert_rows(Run, fields, rows)
    now = timezone.now()
    attempts = []
    for run, pk in zip(runs, ids, strict=True):
        run.pk = pk
        run._state.adding = False
        run.queued_attempts = []
        if run.status != Run.Status.QUEUED:
            continue  # skipped, or nowhere to go: never started, no attempt
        if getattr(run, "held", False):
            ready = HELD_UNTIL
        else:
            ready = run.run_at if run.run_at and run.run_at > now else now
        # One per shard (tasks_app.shards), all inserted below in one batch.
        attempts += shards.first_attempts(run, run.routes, ready, now)
    fields = (
        "run",
        "shard_index",
        "try_number",
        "labels_key",
        "timeout_s",
        "queued_at",
        "ready_at",
        "queue_at",
        "priority",
    )
    attempt_ids = insert_rows(
        Attempt,
        fields,
        [tuple(getattr(a, f.replace("run", "run_id", 1)) for f in fields) for a in attempts],
    )
    for attempt, pk in zip(attempts, attempt_ids, strict=True):
        attempt.pk = pk
        attempt._state.adding = False
        # Callers answer with the run and its attempts without reading them back.
        attempt.run.queued_attempts.append(attempt)
    if attempts:
        _wake_dispatch({a.labels_key for a in attempts})
    events.record_many(_queued_events(runs))
    # Skipped (busy), or failed with nowhere to go: final without ever starting.
    metrics.runs_finished(
        (r.task_name, r.status, None, None) for r in runs if r.status != Run.Status.QUEUED
    )
    return runs


def _queued_events(runs: list[Run]) -> list[Row]:
    """run.queued for each new run, and run.finished at once for one that
    had nowhere to go (a skipped one's reason is known later: _Limits)."""
    rows = []
    for run in runs:
        data = {"trigger": run.trigger}
        if run.retry_of_id:
            data["retry_of"] = run.retry_of_id
        if run.run_at is not None:
            data["run_at"] = run.run_at.isoformat()
        if getattr(run, "held", False):
            data["held"] = True
        rows.append(Row(events.RUN_QUEUED, run.pk, task_id=run.task_id, data=data))
        if run.status == Run.Status.FAILED:
            rows.append(Row(events.RUN_FINISHED, run.pk, task_id=run.task_id, data=_finished(run)))
    return rows


def _finished(run: Run) -> dict:
    """run.finished's data for a run that ended without starting."""
    return {"status": run.status, "reason": run.reason, "duration_s": None}


def _route(runs: list[Run]) -> None:
    """Give each run about to be queued its `routes`, (shard index, labels
    key) per first attempt (tasks_app.routing); a run with nowhere to go (its
    pinned worker was deleted, nobody online to broadcast to) fails at once
    with the reason instead. A broadcast's snapshot records its shard count."""
    queued = [r for r in runs if r.status == Run.Status.QUEUED]
    routes = Routes(r.definition for r in queued)
    for run in queued:
        try:
            run.routes = routes.of(run.definition)
        except Unroutable as exc:
            # Cut to the column: a broadcast's reason names up to 32 labels, and
            # PostgreSQL refuses what does not fit (SQLite kept it whole).
            reason = str(exc)[:500]
            run.status, run.reason, run.finished_at = Run.Status.FAILED, reason, timezone.now()
            continue
        if run.definition.get("strategy") == Strategy.BROADCAST:
            # A copy: runs of one trigger share one snapshot dict.
            run.definition = {**run.definition, "shards": len(run.routes)}


# --- assignment handshake ------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    worker_id: int
    worker_name: str
    attempt_id: int
    capacity: int  # the worker's slots: it is never given more
    run_id: int | None = None  # named in its event (None: not known)


def claim(claims: Sequence[Claim], now=None, *, worker_state: str | None = None) -> int:
    """queued -> assigned for every claim, as one prepared statement; how many moved.

    Each claim moves only if its attempt is still queued (race: another
    dispatcher claiming the same rows) and its worker, counted in the database
    as the statement runs, still has a free slot (race: a dispatcher of another
    server process with its own view of the slots). The caller holds the
    workers' rows locked where the database has row locks. With worker_state,
    the worker must also be in that state, approved and not revoked, as the database
    says now (race: another server reaped, drained or revoked it since this
    one's view of the workers was read).
    """
    if not claims:
        return 0
    at = now or timezone.now()
    now = connection.ops.adapt_datetimefield_value(at)
    eligible = ""
    if worker_state is not None:
        workers = table(Attempt._meta.get_field("worker").related_model)
        eligible = (
            f" AND EXISTS (SELECT 1 FROM {workers} w WHERE w.id = %s AND w.state = %s"
            " AND w.revoked_at IS NULL AND w.approved_at IS NOT NULL)"
        )
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {ATTEMPT} SET status = %s, worker_id = %s, worker_name = %s,"
            " assigned_at = %s, accepted_at = NULL WHERE id = %s AND status = %s"
            f" AND (SELECT COUNT(*) FROM {ATTEMPT} busy WHERE busy.worker_id = %s"
            f" AND busy.status IN (%s, %s)) < %s{eligible}",
            [
                [S.ASSIGNED, c.worker_id, c.worker_name, now, c.attempt_id, S.QUEUED]
                + [c.worker_id, *ACTIVE, c.capacity]
                + ([c.worker_id, worker_state] if eligible else [])
                for c in claims
            ],
        )
        moved = cursor.rowcount
    won = claims
    if moved != len(claims):
        # Some lost their race (another server took them): the rows say which.
        ours = set(
            Attempt.objects.filter(
                pk__in=[c.attempt_id for c in claims], status=S.ASSIGNED, assigned_at=at
            ).values_list("worker_id", "pk")
        )
        won = [c for c in claims if (c.worker_id, c.attempt_id) in ours]
    events.record_many(
        Row(
            events.ATTEMPT_ASSIGNED,
            c.run_id,
            c.attempt_id,
            worker_id=c.worker_id,
            data={"worker": c.worker_name},
        )
        for c in won
    )
    return moved


def assign(attempt_id: int, worker_id: int, worker_name: str) -> bool:
    """queued -> assigned. False when someone else got it first."""
    capacity = Attempt._meta.get_field("worker").related_model.objects.get(pk=worker_id).capacity
    run_id = Attempt.objects.filter(pk=attempt_id).values_list("run_id", flat=True).first()
    return bool(claim([Claim(worker_id, worker_name, attempt_id, capacity, run_id)]))


def _owned(pairs: Iterable[Pair], statuses: Sequence[str]) -> dict[Pair, tuple]:
    """The pairs whose attempt is that worker's and in one of these states,
    locked; each with (run id, assigned_at, whether it was accepted, ready_at)."""
    pairs = set(pairs)
    ids = list({a for _, a in pairs})
    if not ids:
        return {}
    rows = select(
        "SELECT id, worker_id, run_id, assigned_at, accepted_at IS NOT NULL, ready_at"
        f" FROM {ATTEMPT} WHERE id IN ({marks(ids)})"
        # In id order, as every lock on attempts: see lose().
        f" AND status IN ({marks(statuses)}) ORDER BY id{for_update()}",
        [*ids, *statuses],
    )
    return {
        (w, a): (run_id, aware(at), bool(accepted), aware(ready))
        for a, w, run_id, at, accepted, ready in rows
        if (w, a) in pairs
    }


def _between(value: dt.datetime | None, low: dt.datetime | None, high: dt.datetime):
    """An agent's time, held between two of the master's: high when unknown."""
    if value is None:
        return high
    if low is not None and value < low:
        value = low
    return min(value, high)


def accept_many(pairs: Sequence[Pair]) -> set[Pair]:
    """The agents took these assignments; returns the pairs that are still theirs."""
    with atomic():
        ok = _owned(pairs, [S.ASSIGNED])
        Attempt.objects.filter(pk__in=[a for _, a in ok], status=S.ASSIGNED).update(
            accepted_at=timezone.now()
        )
        # Every row read is locked and still assigned: each moves.
        events.record_many(
            Row(events.ATTEMPT_ACCEPTED, run_id, attempt_id, worker_id=worker_id)
            for (worker_id, attempt_id), (run_id, _, accepted, _) in sorted(ok.items())
            if not accepted
        )
    return set(ok)


def mark_accepted(worker_id: int, attempt_id: int) -> bool:
    """The agent took the assignment. False if it is no longer this worker's."""
    return (worker_id, attempt_id) in accept_many([(worker_id, attempt_id)])


@dataclass(frozen=True)
class Started:
    worker_id: int
    attempt_id: int
    started_at: float | None  # the agent's clock
    pid: int | None


def start_many(items: Sequence[Started]) -> set[Pair]:
    """assigned -> running (and accepted, if that was not reported apart); only
    the worker an attempt is assigned to may say so. Returns the pairs that
    moved; their runs move from queued to running."""
    now = timezone.now()
    with atomic():
        owned = _owned([(i.worker_id, i.attempt_id) for i in items], [S.ASSIGNED])
        moves, rows, waits = [], [], []
        for item in items:
            pair = (item.worker_id, item.attempt_id)
            if pair in owned:
                run_id, assigned_at, accepted, ready_at = owned.pop(pair)
                # The agent's clock may be off: a start is never before its
                # assignment nor after the master heard of it.
                started = _between(_from_epoch(item.started_at), assigned_at, now)
                moves.append((started, item.pid, item.attempt_id, run_id))
                ids = {"run_id": run_id, "attempt_id": item.attempt_id, "worker_id": item.worker_id}
                if not accepted:  # the start says it was accepted too
                    rows.append(Row(events.ATTEMPT_ACCEPTED, **ids))
                rows.append(Row(events.ATTEMPT_STARTED, **ids, data={"pid": item.pid}))
                waits.append((started - ready_at).total_seconds())
        moves.sort(key=lambda move: (move[0], move[2]))
        update_rows(
            Attempt,
            {
                "status": "%s",
                "started_at": "%s",
                "pid": "%s",
                "accepted_at": "COALESCE(accepted_at, %s)",
            },
            [(S.RUNNING, started, pid, now, attempt_id) for started, pid, attempt_id, _ in moves],
            where="status = %s",
            where_params=[S.ASSIGNED],
        )
        # Race: two shards starting at once (here, or in another server
        # process); the first one moves the run, in one statement that says
        # which runs it moved (their events) and locks them as it goes.
        first: dict[int, dt.datetime] = {}
        for started, _, _, run_id in moves:  # earliest first
            first.setdefault(run_id, started)
        adapt = connection.ops.adapt_datetimefield_value
        moved_runs = first and select(
            f"UPDATE {RUN} SET status = %s, started_at = CASE id"
            f"{' WHEN %s THEN %s' * len(first)} END"
            f" WHERE id IN ({marks(first)}) AND status = %s RETURNING id, task_id",
            [Run.Status.RUNNING]
            + [value for run_id, at in first.items() for value in (run_id, adapt(at))]
            + [*first, Run.Status.QUEUED],
        )
        rows += [
            Row(events.RUN_STARTED, run_id, task_id=task_id)
            for run_id, task_id in sorted(moved_runs or [])
        ]
        events.record_many(rows)
        metrics.attempts_started(waits)
    moved = {attempt_id for _, _, attempt_id, _ in moves}
    return {(i.worker_id, i.attempt_id) for i in items if i.attempt_id in moved}


def mark_started(
    worker_id: int, attempt_id: int, started_at: float | None, pid: int | None
) -> bool:
    return bool(start_many([Started(worker_id, attempt_id, started_at, pid)]))


def requeue(
    worker_id: int,
    attempt_ids: Iterable[int],
    delay_s: float = 0.0,
    *,
    unaccepted: bool = False,
    assigned_before: dt.datetime | None = None,
    reason: str = "rejected by the agent",
) -> list[int]:
    """assigned -> queued, for assignments an agent refused or never received.

    An attempt whose run is being cancelled is cancelled instead: it must not
    be offered to anyone again. With unaccepted=True only attempts the agent
    never accepted move (the accept-timeout path). Without a delay an attempt
    keeps its place in the queue. Failover: it avoids this worker next time
    when another can take it (dispatch._share_out). reason: why, for its
    event. Returns the ids moved.
    """
    now = timezone.now()
    with atomic():
        # Race: the agent may report "accepted"/"started" concurrently; only rows
        # still assigned (and unaccepted, when asked) move.
        candidates = Attempt.objects.filter(
            pk__in=list(attempt_ids), worker_id=worker_id, status=S.ASSIGNED
        ).order_by("pk")  # locked in id order: see lose()
        if unaccepted:
            candidates = candidates.filter(accepted_at__isnull=True)
        if assigned_before is not None:
            # Race: another server handed it back first and it was assigned
            # again since (to this worker, its only taker): that is a new
            # assignment, not the stale one this server saw.
            candidates = candidates.filter(assigned_at__lt=assigned_before)
        # An attempt of a run being cancelled, or already over (another shard
        # failed for good: fail fast), is cancelled instead of queued again.
        rows = [
            (pk, run_id, bool(cancel) or status in Run.FINAL, key, priority)
            for pk, run_id, cancel, status, key, priority in _locked(candidates).values_list(
                "pk", "run_id", "run__cancel_requested_at", "run__status", "labels_key", "priority"
            )
        ]
        cancelling = [pk for pk, _, cancel, *_ in rows if cancel]
        back: dict[int, list[int]] = {}  # priority -> attempt ids
        for pk, _, cancel, _, priority in rows:
            if not cancel:
                back.setdefault(priority, []).append(pk)
        Attempt.objects.filter(pk__in=cancelling, status=S.ASSIGNED).update(
            status=S.CANCELLED, reason="cancelled", finished_at=now
        )
        fields = {
            "status": S.QUEUED,
            "worker_id": None,
            "worker_name": "",
            "assigned_at": None,
            "accepted_at": None,
            # Failover: next time, another worker with a free slot if there is one.
            "avoid_worker": worker_id,
        }
        ready = now + dt.timedelta(seconds=delay_s)
        for priority, ids in back.items():
            if delay_s:
                fields |= {"ready_at": ready, "queue_at": queue_at(ready, priority)}
            Attempt.objects.filter(pk__in=ids, status=S.ASSIGNED).update(**fields)
        # Every row read is locked and still assigned: each moves.
        gone = {"status": S.CANCELLED, "reason": "cancelled"}
        back_data = {"reason": reason, "delay_s": delay_s}
        out = [
            Row(
                events.ATTEMPT_FINISHED if cancel else events.ATTEMPT_REQUEUED,
                run_id,
                pk,
                worker_id=worker_id,
                data=gone if cancel else back_data,
            )
            for pk, run_id, cancel, *_ in rows
        ]
        if cancelling:
            refresh_runs({run_id for pk, run_id, cancel, *_ in rows if cancel}, out)
        events.record_many(out)
        if back:
            _wake_dispatch({key for _, _, cancel, key, _ in rows if not cancel})
    return [pk for pk, *_ in rows]


def requeue_unaccepted(now: dt.datetime | None = None) -> list[int]:
    """Assignments not accepted within SCHEDULER_ACCEPT_TIMEOUT_S go back to the queue."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.SCHEDULER_ACCEPT_TIMEOUT_S)
    stale: dict[int, list[int]] = {}
    for pk, worker_id in Attempt.objects.filter(
        status=S.ASSIGNED, accepted_at__isnull=True, assigned_at__lt=cutoff
    ).values_list("pk", "worker_id"):
        stale.setdefault(worker_id, []).append(pk)
    moved: list[int] = []
    with atomic():
        for worker_id, ids in stale.items():
            done = requeue(
                worker_id,
                ids,
                unaccepted=True,
                assigned_before=cutoff,
                reason=f"not accepted within {settings.SCHEDULER_ACCEPT_TIMEOUT_S:g}s",
            )
            moved += done
            # The agent may still get the old assign frame late: tell it to drop it.
            _stop([(worker_id, pk) for pk in done])
    return moved


# --- results -------------------------------------------------------------------


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    # The master had already given up on the attempt; the report is kept aside.
    LATE = "late"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Result:
    status: str
    exit_code: int | None
    reason: str
    started_at: float | None
    finished_at: float | None
    output_bytes: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class Finished:
    worker_id: int
    attempt_id: int
    result: Result


def finish_many(items: Sequence[Finished]) -> list[Outcome]:
    """assigned|running -> final, for many results at once; an Outcome per item.

    A second report of the same attempt (a replay, or twice in one batch) is
    a no-op; a report for an attempt the master already ended is kept beside
    it as a late result; each run's state is derived in the same transaction.
    """
    if not items:
        # A report batch without a result. Not a read of nothing: PostgreSQL
        # rejects the empty "IN ()" that SQLite takes.
        return []
    now = timezone.now()
    with atomic():
        ids = list({i.attempt_id for i in items})
        rows = {
            row[0]: row[1:]
            for row in select(
                "SELECT id, worker_id, status, closed_by_master, late_reported_at, try_number,"
                " shard_index, run_id, labels_key, timeout_s, assigned_at, started_at, priority"
                f" FROM {ATTEMPT} WHERE id IN ({marks(ids)}) ORDER BY id{for_update()}",
                ids,
            )
        }
        outcomes: list[Outcome] = []
        stored, late, seen = [], [], set()
        for item in items:
            row = rows.get(item.attempt_id)
            if row is None or row[0] != item.worker_id:
                outcomes.append(Outcome.UNKNOWN)
            elif item.attempt_id in seen:
                outcomes.append(Outcome.DUPLICATE)
            elif row[1] in ACTIVE:
                stored.append(item)
                outcomes.append(Outcome.STORED)
            elif row[2] and row[3] is None:
                # The master declared it lost (or timed it out) first: keep the
                # agent's word beside it, never over it, and never retry because of it.
                late.append(item)
                outcomes.append(Outcome.LATE)
            else:
                outcomes.append(Outcome.DUPLICATE)
            seen.add(item.attempt_id)
        # Race: the service declaring the worker lost at the same moment; the
        # lock and the status condition let exactly one of them win.
        update_rows(
            Attempt,
            {
                "status": "%s",
                "exit_code": "%s",
                "reason": "%s",
                "started_at": "%s",
                "finished_at": "%s",
                "output_bytes": "%s",
                "truncated": "(%s OR truncated)",
            },
            [
                (
                    r.status,
                    r.exit_code,
                    r.reason[:500],
                    *_span(r, *rows[i.attempt_id][9:11], now),
                    max(r.output_bytes, 0),
                    r.truncated,
                    i.attempt_id,
                )
                for i, r in ((i, i.result) for i in stored)
            ],
            where="status IN (%s, %s)",
            where_params=list(ACTIVE),
        )
        update_rows(
            Attempt,
            {
                "late_status": "%s",
                "late_exit_code": "%s",
                "late_reason": "%s",
                "late_reported_at": "%s",
                "output_bytes": "%s",
            },
            [
                (r.status, r.exit_code, r.reason[:500], now, max(r.output_bytes, 0), i.attempt_id)
                for i, r in ((i, i.result) for i in late)
            ],
            where="closed_by_master AND late_reported_at IS NULL",
        )
        out = [
            Row(
                events.ATTEMPT_FINISHED,
                rows[i.attempt_id][6],
                i.attempt_id,
                worker_id=i.worker_id,
                data={**_said(r), "output_bytes": max(r.output_bytes, 0)},
            )
            for i, r in ((i, i.result) for i in stored)
        ]
        out += [
            Row(
                events.ATTEMPT_SUPERSEDED,
                rows[i.attempt_id][6],
                i.attempt_id,
                worker_id=i.worker_id,
                data={**_said(r), "closed_as": rows[i.attempt_id][1]},
            )
            for i, r in ((i, i.result) for i in late)
        ]
        # What _after_final would read back: the new status, and the rest as read.
        _after_final_rows(
            [
                (i.result.status, *rows[i.attempt_id][4:9], i.worker_id, rows[i.attempt_id][11])
                for i in stored
            ],
            out,
        )
        events.record_many(out)
    return outcomes


def _said(result: Result) -> dict:
    """What an attempt's event says of the result its agent reported."""
    return {"status": result.status, "exit_code": result.exit_code, "reason": result.reason[:500]}


def _span(result: Result, assigned_at, started_at, now: dt.datetime) -> tuple:
    """(started, finished) of a result: in order, whoever's clock reported them.

    Instants are held between the master's own (assigned, started, now); the
    length is the agent's, measured on one clock, so a skewed agent clock
    moves an attempt but never turns its duration negative.
    """
    agent_start, agent_end = _from_epoch(result.started_at), _from_epoch(result.finished_at)
    started = aware(started_at) or _between(agent_start, aware(assigned_at), now)
    if agent_start is not None and agent_end is not None:
        return started, min(started + max(agent_end - agent_start, dt.timedelta(0)), now)
    return started, _between(agent_end, started, now)


def finish(worker_id: int, attempt_id: int, result: Result) -> Outcome:
    return finish_many([Finished(worker_id, attempt_id, result)])[0]


def mark_lost(worker_id: int | None, reason: str, keep: Sequence[int] = ()) -> list[int]:
    """Every active attempt of a worker, except those in keep, becomes lost.

    worker_id None: active attempts whose worker was deleted (nobody will
    ever report them).
    """
    with atomic():
        query = Attempt.objects.filter(worker_id=worker_id, status__in=ACTIVE).exclude(
            pk__in=list(keep)
        )
        return lose(list(query.values_list("pk", flat=True)), reason)


def lose(attempt_ids: Sequence[int], reason: str) -> list[int]:
    """These attempts, where still active, become lost (and are retried per policy)."""
    if not attempt_ids:
        return []
    with atomic():
        # Race: a finished report arriving now; only rows still active move.
        # In id order: two servers losing overlapping sets (both reaping one
        # worker) queue on the first row instead of deadlocking.
        rows = list(
            _locked(
                Attempt.objects.filter(pk__in=list(attempt_ids), status__in=ACTIVE).order_by("pk")
            ).values_list("pk", "run_id", "worker_id")
        )
        ids = [pk for pk, _, _ in rows]
        Attempt.objects.filter(pk__in=ids, status__in=ACTIVE).update(
            status=S.LOST,
            reason=reason[:500],
            finished_at=timezone.now(),
            closed_by_master=True,
        )
        out = [
            Row(events.ATTEMPT_LOST, run_id, pk, worker_id=worker_id, data={"reason": reason[:500]})
            for pk, run_id, worker_id in rows
        ]
        _after_final(ids, out)
        events.record_many(out)
        metrics.attempts_lost(len(ids))
    return ids


def fail_pinned(worker_id: int, worker_name: str, what: str = "deleted") -> list[int]:
    """The worker was deleted (or revoked): queued attempts pinned to it (pinned and
    broadcast runs, retries of its lost attempts included) can never run, so
    they fail now, without retries, and their runs fail with the reason."""
    pin = pin_label(worker_id)
    on_it = (
        Q(labels_key=pin)
        | Q(labels_key__startswith=f"{pin},")
        | Q(labels_key__endswith=f",{pin}")
        | Q(labels_key__contains=f",{pin},")
    )
    with atomic():
        rows = list(
            _locked(Attempt.objects.filter(on_it, status=S.QUEUED).order_by("pk")).values_list(
                "pk", "run_id"
            )
        )
        reason = f"pinned worker {worker_name!r} was {what}"[:500]
        # Race: a dispatcher claiming one at this moment; only rows still queued move.
        Attempt.objects.filter(pk__in=[pk for pk, _ in rows], status=S.QUEUED).update(
            status=S.FAILED, reason=reason, finished_at=timezone.now()
        )
        failed = {"status": S.FAILED, "reason": reason}
        out = [Row(events.ATTEMPT_FINISHED, run_id, pk, data=failed) for pk, run_id in rows]
        refresh_runs({run_id for _, run_id in rows}, out)
        events.record_many(out)
    return [pk for pk, _ in rows]


def fail_unstartable(attempt_ids: Sequence[int], reason: str) -> list[int]:
    """Queued or assigned attempts that can never run as they are (their run's
    secrets cannot be decrypted): they fail now, without retries (each would
    fail the same way), and their runs fail with the reason. An agent holding
    one of them assigned is told to drop it."""
    if not attempt_ids:
        return []
    waiting = (S.QUEUED, S.ASSIGNED)
    with atomic():
        # In id order, as every lock on attempts (see lose()).
        rows = list(
            _locked(
                Attempt.objects.filter(pk__in=list(attempt_ids), status__in=waiting).order_by("pk")
            ).values_list("pk", "run_id", "worker_id", "status")
        )
        now = timezone.now()
        for status in waiting:
            # Race: a claim or an agent's start at this moment; only rows still
            # in the state read move. An assigned one is closed by the master: a
            # late report from its agent is kept aside, never over it.
            Attempt.objects.filter(
                pk__in=[pk for pk, _, _, s in rows if s == status], status=status
            ).update(
                status=S.FAILED,
                reason=reason[:500],
                finished_at=now,
                closed_by_master=status == S.ASSIGNED,
            )
        failed = {"status": S.FAILED, "reason": reason[:500]}
        out = [
            Row(events.ATTEMPT_FINISHED, run_id, pk, worker_id=worker_id, data=failed)
            for pk, run_id, worker_id, _ in rows
        ]
        refresh_runs({run_id for _, run_id, _, _ in rows}, out)
        events.record_many(out)
        _stop([(worker_id, pk) for pk, _, worker_id, s in rows if s == S.ASSIGNED])
    return [pk for pk, *_ in rows]


def time_out_overdue(now: dt.datetime | None = None) -> list[int]:
    """Master backstop: running attempts far past their timeout become timed_out.

    The agent enforces timeouts itself; this catches an agent that hangs or
    cannot report, SCHEDULER_TIMEOUT_GRACE_S after the deadline.
    """
    now = now or timezone.now()
    grace = dt.timedelta(seconds=settings.SCHEDULER_TIMEOUT_GRACE_S)
    overdue: dict[int, list[Pair]] = {}
    run_of: dict[int, int] = {}
    # Counted from assigned_at, our own clock: started_at comes from the agent's
    # clock, which may be off by minutes. Assigned is a few ms before started.
    for pk, worker_id, assigned_at, timeout, run_id in Attempt.objects.filter(
        status=S.RUNNING, timeout_s__isnull=False
    ).values_list("pk", "worker_id", "assigned_at", "timeout_s", "run_id"):
        if assigned_at and assigned_at + dt.timedelta(seconds=timeout) + grace < now:
            overdue.setdefault(timeout, []).append((worker_id, pk))
            run_of[pk] = run_id
    ended: list[Pair] = []
    out: list[Row] = []
    with atomic():
        for timeout, pairs in overdue.items():
            ids = [pk for _, pk in pairs]
            # Race: the agent's own result arriving now; only rows still running move.
            moving = set(
                _locked(
                    Attempt.objects.filter(pk__in=ids, status=S.RUNNING).order_by("pk")
                ).values_list("pk", flat=True)
            )
            reason = f"timed out after {timeout}s (master backstop: the agent did not report)"
            Attempt.objects.filter(pk__in=moving, status=S.RUNNING).update(
                status=S.TIMED_OUT,
                reason=reason,
                finished_at=now,
                closed_by_master=True,
            )
            ended += [pair for pair in pairs if pair[1] in moving]
            data = {"status": S.TIMED_OUT, "reason": reason}
            out += [
                Row(events.ATTEMPT_FINISHED, run_of[pk], pk, worker_id=worker_id, data=data)
                for worker_id, pk in sorted(pairs, key=lambda pair: pair[1])
                if pk in moving
            ]
        _after_final([pk for _, pk in ended], out)
        events.record_many(out)
        _stop(ended)
    return [pk for _, pk in ended]


def _after_final(attempt_ids: Sequence[int], out: list[Row]) -> None:
    """Queue retries for attempts that ended badly, then recompute their runs;
    their events go to `out`."""
    if not attempt_ids:
        return
    _after_final_rows(
        list(
            Attempt.objects.filter(pk__in=list(attempt_ids))
            .order_by()
            .values_list(
                "status",
                "try_number",
                "shard_index",
                "run_id",
                "labels_key",
                "timeout_s",
                "worker_id",
                "priority",
            )
        ),
        out,
    )


def _after_final_rows(rows: list[tuple], out: list[Row]) -> None:
    """_after_final for (status, try, shard, run id, labels key, timeout,
    worker id, priority) rows the caller already holds; the events of what
    it changes (retries queued, runs started or ended) go to `out`, for the
    caller's one INSERT.

    Failover: a retry avoids the worker its try ended on (lost, failed or
    timed out there), when another eligible worker has a free slot at
    dispatch (see dispatch._share_out); a pinned try's key admits no other.
    """
    if not rows:
        return
    # The runs first, all of them and in id order, as refresh_runs below locks
    # them again: whether a run is over (fail fast) is read under its lock, so
    # a shard failing for good elsewhere at this moment cannot slip a retry in.
    if for_update():
        run_ids = sorted({row[3] for row in rows})
        locking = f"SELECT id FROM {RUN} WHERE id IN ({marks(run_ids)}) ORDER BY id FOR UPDATE"
        select(locking, run_ids)
    retryable = [row for row in rows if row[0] in RETRYABLE]
    retries: list[Attempt] = []
    retried_after: list[str] = []  # the statuses the retried tries ended with
    if retryable:
        runs = {
            pk: (definition, cancelling or status in Run.FINAL)
            for pk, definition, cancelling, status in Run.objects.filter(
                pk__in={row[3] for row in retryable}
            )
            .order_by()
            .values_list("pk", "definition", "cancel_requested_at", "status")
        }
        now = timezone.now()
        for status, try_number, shard_index, run_id, key, timeout, worker_id, priority in retryable:
            # Not for a run being cancelled, nor one already over (another of
            # its shards failed for good: fail fast).
            definition, over = runs[run_id]
            if over or try_number > definition.get("max_retries", 0):
                continue
            delay = backoff_seconds(
                try_number,
                definition.get("retry_backoff_s", 10.0),
                definition.get("retry_backoff_max_s", 600.0),
            )
            ready = now + dt.timedelta(seconds=delay)
            retried_after.append(status)
            retries.append(
                Attempt.queued(
                    run_id=run_id,
                    shard_index=shard_index,
                    try_number=try_number + 1,
                    labels_key=key,
                    timeout_s=timeout,
                    ready=ready,
                    now=now,
                    priority=priority,
                    avoid_worker=worker_id,
                )
            )
        # Race: two processes retrying the same attempt; the unique (run, shard,
        # try) constraint lets only one create the next try.
        Attempt.objects.bulk_create(retries, ignore_conflicts=True)
        out += _retry_events(retries, now)
        metrics.attempts_retried(retried_after)
    refresh_runs({row[3] for row in rows}, out)
    if retries:
        _wake_dispatch({a.labels_key for a in retries})


def _retry_events(retries: list[Attempt], now: dt.datetime) -> list[Row]:
    """attempt.queued for the retries this process inserted: bulk_create
    skipping conflicts gives no ids back, so they are read (queued at our
    `now`: another process's would have its own), once per batch with retries."""
    if not retries:
        return []
    tries = {(a.run_id, a.shard_index, a.try_number): a for a in retries}
    ours = Attempt.objects.filter(
        run_id__in={a.run_id for a in retries}, queued_at=now, status=S.QUEUED
    ).values_list("pk", "run_id", "shard_index", "try_number")
    found = {(run_id, shard, t): pk for pk, run_id, shard, t in ours}
    rows = []
    for key, attempt in tries.items():
        if key in found:
            delay = round((attempt.ready_at - now).total_seconds(), 3)
            data = {
                "try_number": attempt.try_number,
                "shard_index": attempt.shard_index,
                "delay_s": delay,
            }
            rows.append(Row(events.ATTEMPT_QUEUED, attempt.run_id, found[key], data=data))
    return rows


def backoff_seconds(try_number: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base * 2^(n-1), capped, then 50-100% of it.

    The jitter spreads retries of many runs that failed together (a lost
    node) so they do not all land on the survivors at the same instant.
    """
    ceiling = min(cap, base * 2 ** max(try_number - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)


def refresh_runs(run_ids: Iterable[int], out: list[Row] | None = None) -> None:
    """Recompute each run's status from the latest attempt of each shard.

    Two reads per batch of runs, whatever their shard counts: the runs, then
    their attempts. A run whose shards all succeeded gets its merge attempt
    queued here; a run that failed while other shards still go stops them
    (fail fast, tasks_app.shards.verdict). The events of what changed go to
    `out` (the caller's batch), or are recorded here without one.
    """
    if out is None:
        out = []
        refresh_runs(run_ids, out)
        events.record_many(out)
        return
    run_ids = list(run_ids)
    if not run_ids:
        return
    # Race: the last shards of one run finishing in two server processes at
    # once. Each locks its attempts, then the run here (ids in order), and
    # reads the attempts only once it holds the run: the second reads after
    # the first committed and sees every shard final, so exactly one of them
    # queues the merge or finishes the run. (SQLite: one writer anyway.)
    # What each run was, as read under its lock: whether a change is its
    # first start, and how long it took, for the events.
    was: dict[int, tuple] = {}
    runs = {}
    names = {}  # for the metrics
    for pk, definition, cancelling, status, started_at, task_id, name in select(
        f"SELECT id, definition, cancel_requested_at, status, started_at, task_id, task_name"
        f" FROM {RUN}"
        f" WHERE id IN ({marks(run_ids)}) AND status NOT IN ({marks(Run.FINAL)})"
        f" ORDER BY id{for_update()}",
        [*run_ids, *Run.FINAL],
    ):
        runs[pk] = (json_value(definition), bool(cancelling))
        was[pk] = (status, aware(started_at), task_id)
        names[pk] = name
    if not runs:
        return
    finals, starts, merges, fail_fast = [], [], [], []
    now = timezone.now()
    ids = _to_judge(runs, starts, now)
    latest: dict[int, dict[int, shards.Latest]] = {}
    # Every run may be quiet (nothing to read): PostgreSQL rejects an empty "IN ()".
    for run_id, shard, try_number, status, reason, started, finished in ids and select(
        "SELECT run_id, shard_index, try_number, status, reason, started_at, finished_at"
        f" FROM {ATTEMPT} WHERE run_id IN ({marks(ids)})",
        ids,
    ):
        by_shard = latest.setdefault(run_id, {})
        current = by_shard.get(shard)
        if current is None or try_number > current.try_number:
            by_shard[shard] = shards.Latest(
                shard, try_number, status, reason, aware(started), aware(finished)
            )
    for run_id, by_shard in latest.items():
        definition, cancelling = runs[run_id]
        attempts = list(by_shard.values())
        started = min((a.started_at for a in attempts if a.started_at), default=None)
        verdict = shards.verdict(definition, by_shard, cancelling)
        if verdict.status is not None:
            finished = max((a.finished_at for a in attempts if a.finished_at), default=now)
            finals.append((verdict.status, verdict.reason[:500], finished, started, run_id))
            if verdict.fail_fast:
                fail_fast.append(run_id)
            continue
        if verdict.queue_merge:
            merges.append(shards.merge_attempt(run_id, definition, now))
        if any(a.status == S.RUNNING or a.status in FINAL_ATTEMPT for a in attempts):
            starts.append((Run.Status.RUNNING, started or now, run_id))
    # Race: only a run that is not final yet can be finished, once.
    update_rows(
        Run,
        {
            "status": "%s",
            "reason": "%s",
            "finished_at": "%s",
            "started_at": "COALESCE(started_at, %s)",
        },
        finals,
        where=f"status NOT IN ({marks(Run.FINAL)})",
        where_params=list(Run.FINAL),
    )
    metrics.runs_finished(
        (names[pk], status, started, finished) for status, _, finished, started, pk in finals
    )
    update_rows(
        Run,
        {"status": "%s", "started_at": "%s"},
        starts,
        where="status = %s",
        where_params=[Run.Status.QUEUED],
    )
    out += _run_events(was, starts, finals)
    if merges:
        # Race: two processes storing the last shards' results of one run at
        # once; the unique (run, shard, try) constraint makes one merge attempt.
        Attempt.objects.bulk_create(merges, ignore_conflicts=True)
        _wake_dispatch({a.labels_key for a in merges})
        out += [
            Row(events.ATTEMPT_QUEUED, a.run_id, task_id=was[a.run_id][2], data={"merge": True})
            for a in merges
        ]
    if fail_fast:
        _stop_the_rest(fail_fast, now, out)
    if finals:
        _release_held([run_id for *_, run_id in finals])


def _run_events(was: dict[int, tuple], starts: list[tuple], finals: list[tuple]) -> list[Row]:
    """run.started for runs that were queued and started now (or ended having
    started), run.finished for those that ended: each row read locked and
    not final, so each moves, once."""
    rows = []
    for _, _, run_id in starts:
        status, _, task_id = was[run_id]
        if status == Run.Status.QUEUED:
            rows.append(Row(events.RUN_STARTED, run_id, task_id=task_id))
    for status, reason, finished, started, run_id in finals:
        before, started_at, task_id = was[run_id]
        started_at = started_at or started
        if before == Run.Status.QUEUED and started is not None:
            rows.append(Row(events.RUN_STARTED, run_id, task_id=task_id))
        duration = None
        if started_at is not None and finished is not None:
            duration = round(max((finished - started_at).total_seconds(), 0.0), 3)
        data = {"status": status, "reason": reason, "duration_s": duration}
        rows.append(Row(events.RUN_FINISHED, run_id, task_id=task_id, data=data))
    return rows


def _to_judge(runs: dict[int, tuple[dict, bool]], starts: list, now: dt.datetime) -> list[int]:
    """Of these runs, those whose every shard refresh_runs must read.

    A sharded run can end, or need its merge, only once none of its attempts
    is still queued or going, or once a shard's latest try ended badly (fail
    fast), or while it is cancelled; until then one aggregate row per run,
    counted by the database, says all there is to say (whether it started).
    Without this, each result of a 1,000-shard run read its 1,000 attempts.
    One-shard runs are judged at once, as before: nothing to save there.
    """
    sharded = [
        pk
        for pk, (definition, cancelling) in runs.items()
        if not cancelling and (shards.shard_count(definition) > 1 or shards.has_merge(definition))
    ]
    if not sharded:
        return list(runs)
    going = [S.QUEUED, *ACTIVE]
    bad = [S.FAILED, S.TIMED_OUT, S.LOST, S.CANCELLED]
    quiet = set()
    for run_id, active, bad_latest, begun, started in select(
        f"SELECT a.run_id, SUM(CASE WHEN a.status IN ({marks(going)}) THEN 1 ELSE 0 END),"
        f" SUM(CASE WHEN a.status IN ({marks(bad)}) AND NOT EXISTS (SELECT 1 FROM {ATTEMPT} b"
        " WHERE b.run_id = a.run_id AND b.shard_index = a.shard_index"
        " AND b.try_number > a.try_number) THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN a.status IN (%s, %s) THEN 0 ELSE 1 END),"
        f" MIN(a.started_at) FROM {ATTEMPT} a WHERE a.run_id IN ({marks(sharded)})"
        " GROUP BY a.run_id",
        [*going, *bad, S.QUEUED, S.ASSIGNED, *sharded],
    ):
        if active and not bad_latest:
            quiet.add(run_id)
            if begun:  # an attempt runs or ran: the run is running
                if isinstance(started, str):  # SQLite: an aggregate loses its column's type
                    started = parse_datetime(started)
                starts.append((Run.Status.RUNNING, aware(started) or now, run_id))
    return [pk for pk in runs if pk not in quiet]


def _stop_the_rest(run_ids: list[int], now: dt.datetime, out: list[Row]) -> None:
    """Runs that failed while some of their shards were still going: cancel
    the queued attempts, tell the agents to kill the running ones (they report
    `cancelled`, which refresh_runs ignores for a run already final)."""
    # Race: a dispatcher claiming one of these now; only rows still queued move,
    # and a claimed one is stopped below or, if claimed after this read, is
    # refused by _after_final_rows' check of the run (no retry for a final run).
    reason = "cancelled: another shard failed"
    waiting = select(
        f"UPDATE {ATTEMPT} SET status = %s, reason = %s, finished_at = %s"
        f" WHERE run_id IN ({marks(run_ids)}) AND status = %s RETURNING id, run_id",
        [S.CANCELLED, reason, connection.ops.adapt_datetimefield_value(now), *run_ids, S.QUEUED],
    )
    out += [
        Row(events.ATTEMPT_FINISHED, run_id, pk, data={"status": S.CANCELLED, "reason": reason})
        for pk, run_id in waiting
    ]
    _stop(
        list(
            Attempt.objects.filter(run_id__in=run_ids, status__in=ACTIVE).values_list(
                "worker_id", "pk"
            )
        )
    )


# --- cancelling ----------------------------------------------------------------


def cancel_run(run: Run, by: str = "") -> Run:
    """Cancel now what has not started; ask agents to kill what runs.

    by: who asked (a username), shown with the run.
    """
    outcome = cancel_runs([run.pk], by=by)
    run.refresh_from_db()
    if outcome.get(run.pk):
        raise RunNotCancellable(f"run {run.pk} already {outcome[run.pk]}")
    return run


def cancel_runs(run_ids: Iterable[int], by: str = "") -> dict[int, str | None]:
    """Cancel many runs in one transaction, in a handful of statements whatever
    their number. Per run found: None when cancelled, its status when it was
    already final (refused); ids of no run are left out. A run already being
    cancelled is cancelled again (its queued attempts, its agents told again):
    nothing changes but the kill being sent once more.

    by: who asked (a username), shown with each run.
    """
    ids = sorted(set(run_ids))
    if not ids:
        return {}
    # One transaction, or a savepoint inside the caller's (a view's, with its audit entry).
    with transaction.atomic():
        # Race: two cancels, or a cancel and the final result. The rows are
        # locked (PostgreSQL; SQLite has one writer) in id order, as
        # refresh_runs locks them, and read under the lock: a run final here
        # stays final, one that is not can only end through refresh_runs below.
        rows = _locked(Run.objects.filter(pk__in=ids).order_by("pk")).values_list(
            "pk", "status", "cancel_requested_at", "task_id"
        )
        outcome, going, out = {}, [], []
        for pk, status, asked_at, task_id in rows:
            outcome[pk] = status if status in Run.FINAL else None
            if outcome[pk] is None:
                going.append(pk)
                if asked_at is None:  # asked now, not again
                    out.append(
                        Row(events.RUN_CANCEL_REQUESTED, pk, task_id=task_id, data={"by": by})
                    )
        if not going:
            return outcome
        now = timezone.now()
        Run.objects.filter(pk__in=going, cancel_requested_at__isnull=True).exclude(
            status__in=Run.FINAL
        ).update(cancel_requested_at=now, cancel_requested_by=by[:150])
        # Race: a dispatcher claiming one now; only rows still queued move (and say so).
        cancelled = select(
            f"UPDATE {ATTEMPT} SET status = %s, reason = %s, finished_at = %s"
            f" WHERE run_id IN ({marks(going)}) AND status = %s RETURNING id, run_id",
            [S.CANCELLED, "cancelled", connection.ops.adapt_datetimefield_value(now)]
            + [*going, S.QUEUED],
        )
        out += [
            Row(
                events.ATTEMPT_FINISHED,
                run_id,
                pk,
                data={"status": S.CANCELLED, "reason": "cancelled"},
            )
            for pk, run_id in sorted(cancelled)
        ]
        active = list(
            Attempt.objects.filter(run_id__in=going, status__in=ACTIVE).values_list(
                "worker_id", "pk"
            )
        )
        _stop(active)
        refresh_runs(going, out)
        events.record_many(out)
    return outcome
