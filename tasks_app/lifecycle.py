"""The run lifecycle: trigger, assign, accept, start, log, finish, lose,
retry, cancel.

Every transition is one conditional UPDATE whose row count says who won, so
two consumers, a consumer and the service, or two server processes can never
both apply it. Callers translate frames and requests into these calls.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from tasks_app.exceptions import RunNotCancellable, RunNotRetryable, TaskDisabled
from tasks_app.models import Attempt, LogChunk, Run, SchedulerState, Task
from tasks_app.signals import stop_requested, work_queued

ACTIVE = Attempt.ACTIVE
FINAL_ATTEMPT = Attempt.FINAL
RETRYABLE = (Attempt.Status.FAILED, Attempt.Status.TIMED_OUT, Attempt.Status.LOST)


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value, tz=dt.UTC)


def _wake_dispatch() -> None:
    transaction.on_commit(lambda: work_queued.send(sender=Run))


def _stop(attempts: list[tuple[int, int]]) -> None:
    """Tell the agents running these (worker id, attempt id) pairs to kill them."""
    if attempts:
        transaction.on_commit(lambda: stop_requested.send(sender=Attempt, attempts=attempts))


# --- triggering ----------------------------------------------------------------


def trigger_run(task: Task, trigger: str = Run.Trigger.MANUAL, user=None) -> Run:
    """Create a run with a snapshot of the task and queue its first attempt."""
    if not task.enabled:
        raise TaskDisabled(f"task {task.name!r} is disabled")
    return _create_run(task, task.name, task.definition(), trigger, user)


def retry_run(run: Run, user=None) -> Run:
    """A new run of exactly what a finished run ran (its snapshot), linked to it."""
    if not run.is_final:
        raise RunNotRetryable(f"run {run.pk} is {run.status}; only a finished run can be retried")
    return _create_run(
        run.task, run.task_name, run.definition, Run.Trigger.RETRY, user, retry_of=run
    )


def _create_run(task, task_name, definition, trigger, user, retry_of=None) -> Run:
    with transaction.atomic():
        run = Run.objects.create(
            task=task,
            task_name=task_name,
            definition=definition,
            trigger=trigger,
            retry_of=retry_of,
            created_by=user if user is not None and user.is_authenticated else None,
        )
        Attempt.objects.create(run=run, shard_index=0, try_number=1)
        _wake_dispatch()
    return run


# --- assignment handshake ------------------------------------------------------


def assign(attempt_id: int, worker_id: int, worker_name: str) -> bool:
    """queued -> assigned. False when someone else got it first."""
    # Race: two dispatchers picking the same queued attempt; only one UPDATE matches.
    return bool(
        Attempt.objects.filter(pk=attempt_id, status=Attempt.Status.QUEUED).update(
            status=Attempt.Status.ASSIGNED,
            worker_id=worker_id,
            worker_name=worker_name,
            assigned_at=timezone.now(),
            accepted_at=None,
        )
    )


def mark_accepted(worker_id: int, attempt_id: int) -> bool:
    """The agent took the assignment. False if it is no longer this worker's."""
    return bool(
        Attempt.objects.filter(
            pk=attempt_id, worker_id=worker_id, status=Attempt.Status.ASSIGNED
        ).update(accepted_at=timezone.now())
    )


def requeue(
    worker_id: int, attempt_ids: Iterable[int], delay_s: float = 0.0, *, unaccepted: bool = False
) -> list[int]:
    """assigned -> queued, for assignments an agent refused or never received.

    An attempt whose run is being cancelled is cancelled instead: it must not
    be offered to anyone again. With unaccepted=True only attempts the agent
    never accepted move (the accept-timeout path). Returns the ids moved.
    """
    candidates = Attempt.objects.filter(
        pk__in=list(attempt_ids), worker_id=worker_id, status=Attempt.Status.ASSIGNED
    )
    if unaccepted:
        candidates = candidates.filter(accepted_at__isnull=True)
    now = timezone.now()
    with transaction.atomic():
        ids = list(candidates.values_list("pk", flat=True))
        cancelling = list(
            candidates.filter(run__cancel_requested_at__isnull=False).values_list("pk", flat=True)
        )
        # Race: the agent may report "accepted"/"started" concurrently; only rows
        # still assigned (and unaccepted, when asked) move.
        still = Attempt.objects.filter(pk__in=ids, status=Attempt.Status.ASSIGNED)
        if unaccepted:
            still = still.filter(accepted_at__isnull=True)
        moved = list(still.values_list("pk", flat=True))
        still.filter(pk__in=cancelling).update(
            status=Attempt.Status.CANCELLED, reason="cancelled", finished_at=now
        )
        still.exclude(pk__in=cancelling).update(
            status=Attempt.Status.QUEUED,
            worker=None,
            assigned_at=None,
            accepted_at=None,
            not_before=now + dt.timedelta(seconds=delay_s) if delay_s else None,
        )
        if set(moved) & set(cancelling):
            refresh_runs(
                set(Attempt.objects.filter(pk__in=cancelling).values_list("run_id", flat=True))
            )
        if set(moved) - set(cancelling):
            _wake_dispatch()
    return moved


def requeue_unaccepted(now: dt.datetime | None = None) -> list[int]:
    """Assignments not accepted within SCHEDULER_ACCEPT_TIMEOUT_S go back to the queue."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.SCHEDULER_ACCEPT_TIMEOUT_S)
    stale: dict[int, list[int]] = {}
    for pk, worker_id in Attempt.objects.filter(
        status=Attempt.Status.ASSIGNED, accepted_at__isnull=True, assigned_at__lt=cutoff
    ).values_list("pk", "worker_id"):
        stale.setdefault(worker_id, []).append(pk)
    moved: list[int] = []
    with transaction.atomic():
        for worker_id, ids in stale.items():
            done = requeue(worker_id, ids, unaccepted=True)
            moved += done
            # The agent may still get the old assign frame late: tell it to drop it.
            _stop([(worker_id, pk) for pk in done])
    return moved


def mark_started(
    worker_id: int, attempt_id: int, started_at: float | None, pid: int | None
) -> bool:
    """assigned -> running; only the worker the attempt is assigned to may say so."""
    started = _from_epoch(started_at) or timezone.now()
    updated = Attempt.objects.filter(
        pk=attempt_id, worker_id=worker_id, status=Attempt.Status.ASSIGNED
    ).update(status=Attempt.Status.RUNNING, started_at=started, pid=pid)
    if updated:
        # Race: two shards starting at once; the first one moves the run.
        Run.objects.filter(attempts__pk=attempt_id, status=Run.Status.QUEUED).update(
            status=Run.Status.RUNNING, started_at=started
        )
    return bool(updated)


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


def finish(worker_id: int, attempt_id: int, result: Result) -> Outcome:
    """assigned|running -> final. A second report of the same attempt is a no-op."""
    now = timezone.now()
    with transaction.atomic():
        # Race: a replayed report, or the service declaring the worker lost at the
        # same moment; the conditional UPDATE lets exactly one of them win.
        updated = Attempt.objects.filter(
            pk=attempt_id, worker_id=worker_id, status__in=ACTIVE
        ).update(
            status=result.status,
            exit_code=result.exit_code,
            reason=result.reason[:500],
            started_at=_from_epoch(result.started_at) or Coalesce(F("started_at"), Value(now)),
            finished_at=_from_epoch(result.finished_at) or now,
            output_bytes=max(result.output_bytes, 0),
            truncated=result.truncated or F("truncated"),
        )
        if updated:
            _after_final([attempt_id])
            return Outcome.STORED
        # The master declared it lost (or timed it out) first: keep the agent's
        # word beside it, never over it, and never retry because of it.
        late = Attempt.objects.filter(
            pk=attempt_id, worker_id=worker_id, closed_by_master=True, late_reported_at__isnull=True
        ).update(
            late_status=result.status,
            late_exit_code=result.exit_code,
            late_reason=result.reason[:500],
            late_reported_at=now,
            output_bytes=max(result.output_bytes, 0),
        )
        if late:
            return Outcome.LATE
        known = Attempt.objects.filter(pk=attempt_id, worker_id=worker_id).exists()
        return Outcome.DUPLICATE if known else Outcome.UNKNOWN


def mark_lost(worker_id: int | None, reason: str, keep: Sequence[int] = ()) -> list[int]:
    """Every active attempt of a worker, except those in keep, becomes lost.

    worker_id None: active attempts whose worker was deleted (nobody will
    ever report them).
    """
    with transaction.atomic():
        query = Attempt.objects.filter(worker_id=worker_id, status__in=ACTIVE).exclude(
            pk__in=list(keep)
        )
        ids = list(query.values_list("pk", flat=True))
        if not ids:
            return []
        # Race: a finished report arriving now; status__in=ACTIVE keeps whichever came first.
        Attempt.objects.filter(pk__in=ids, status__in=ACTIVE).update(
            status=Attempt.Status.LOST,
            reason=reason[:500],
            finished_at=timezone.now(),
            closed_by_master=True,
        )
        _after_final(ids)
    return ids


def time_out_overdue(now: dt.datetime | None = None) -> list[int]:
    """Master backstop: running attempts far past their timeout become timed_out.

    The agent enforces timeouts itself; this catches an agent that hangs or
    cannot report, SCHEDULER_TIMEOUT_GRACE_S after the deadline.
    """
    now = now or timezone.now()
    grace = dt.timedelta(seconds=settings.SCHEDULER_TIMEOUT_GRACE_S)
    overdue = []
    candidates = Attempt.objects.filter(status=Attempt.Status.RUNNING).filter(
        run__definition__timeout__isnull=False
    )
    # Counted from assigned_at, our own clock: started_at comes from the agent's
    # clock, which may be off by minutes. Assigned is a few ms before started.
    for pk, worker_id, assigned_at, definition in candidates.values_list(
        "pk", "worker_id", "assigned_at", "run__definition"
    ):
        timeout = definition.get("timeout")
        if timeout and assigned_at and assigned_at + dt.timedelta(seconds=timeout) + grace < now:
            overdue.append((pk, worker_id, timeout))
    ended = []
    with transaction.atomic():
        for pk, worker_id, timeout in overdue:
            if Attempt.objects.filter(pk=pk, status=Attempt.Status.RUNNING).update(
                status=Attempt.Status.TIMED_OUT,
                reason=f"timed out after {timeout}s (master backstop: the agent did not report)",
                finished_at=now,
                closed_by_master=True,
            ):
                ended.append((worker_id, pk))
        _after_final([pk for _, pk in ended])
        _stop(ended)
    return [pk for _, pk in ended]


def _after_final(attempt_ids: Sequence[int]) -> None:
    """Queue retries for attempts that ended badly, then recompute their runs."""
    attempts = list(
        Attempt.objects.filter(pk__in=list(attempt_ids))
        .select_related("run")
        .only(
            "pk",
            "status",
            "try_number",
            "shard_index",
            "run__definition",
            "run__cancel_requested_at",
            "run_id",
        )
    )
    retried = False
    for attempt in attempts:
        if attempt.status not in RETRYABLE or attempt.run.cancel_requested_at:
            continue
        definition = attempt.run.definition
        if attempt.try_number > definition.get("max_retries", 0):
            continue
        delay = backoff_seconds(
            attempt.try_number,
            definition.get("retry_backoff_s", 10.0),
            definition.get("retry_backoff_max_s", 600.0),
        )
        try:
            # Race: two processes retrying the same attempt; the unique
            # (run, shard, try) constraint lets only one create the next try.
            with transaction.atomic():
                Attempt.objects.create(
                    run_id=attempt.run_id,
                    shard_index=attempt.shard_index,
                    try_number=attempt.try_number + 1,
                    not_before=timezone.now() + dt.timedelta(seconds=delay),
                )
            retried = True
        except IntegrityError:
            pass
    refresh_runs({a.run_id for a in attempts})
    if retried:
        _wake_dispatch()


def backoff_seconds(try_number: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base * 2^(n-1), capped, then 50-100% of it.

    The jitter spreads retries of many runs that failed together (a lost
    node) so they do not all land on the survivors at the same instant.
    """
    ceiling = min(cap, base * 2 ** max(try_number - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)


def refresh_runs(run_ids: Iterable[int]) -> None:
    """Recompute each run's status from the latest attempt of each shard."""
    run_ids = list(run_ids)
    latest: dict[int, dict[int, Attempt]] = {}
    for attempt in Attempt.objects.filter(run_id__in=run_ids).only(
        "run_id", "shard_index", "try_number", "status", "reason", "started_at", "finished_at"
    ):
        shards = latest.setdefault(attempt.run_id, {})
        current = shards.get(attempt.shard_index)
        if current is None or attempt.try_number > current.try_number:
            shards[attempt.shard_index] = attempt
    cancel_requested = set(
        Run.objects.filter(pk__in=run_ids, cancel_requested_at__isnull=False).values_list(
            "pk", flat=True
        )
    )
    for run_id, shards in latest.items():
        attempts = list(shards.values())
        statuses = {a.status for a in attempts}
        started = [a.started_at for a in attempts if a.started_at]
        if statuses <= set(FINAL_ATTEMPT):
            reason = ""
            if statuses == {Attempt.Status.SUCCEEDED}:
                status = Run.Status.SUCCEEDED
            elif Attempt.Status.CANCELLED in statuses or run_id in cancel_requested:
                status = Run.Status.CANCELLED
            else:
                status = Run.Status.FAILED
                bad = next(a for a in attempts if a.status != Attempt.Status.SUCCEEDED)
                tries = bad.try_number
                reason = (
                    f"{bad.reason or bad.status} (after {tries} attempt{'s' if tries > 1 else ''})"
                )
            finished = max(
                (a.finished_at for a in attempts if a.finished_at), default=timezone.now()
            )
            # Race: only a run that is not final yet can be finished, once.
            Run.objects.filter(pk=run_id).exclude(status__in=Run.FINAL).update(
                status=status,
                reason=reason[:500],
                finished_at=finished,
                started_at=Coalesce(F("started_at"), Value(min(started) if started else None)),
            )
        elif statuses & {Attempt.Status.RUNNING, *FINAL_ATTEMPT}:
            Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
                status=Run.Status.RUNNING, started_at=min(started) if started else timezone.now()
            )


# --- cancelling ----------------------------------------------------------------


def cancel_run(run: Run) -> Run:
    """Cancel now what has not started; ask agents to kill what runs."""
    with transaction.atomic():
        # Race: two cancels, or a cancel and the final result; only a run that is
        # not final and not already being cancelled moves.
        Run.objects.filter(pk=run.pk, cancel_requested_at__isnull=True).exclude(
            status__in=Run.FINAL
        ).update(cancel_requested_at=timezone.now())
        run.refresh_from_db()
        if run.is_final:
            raise RunNotCancellable(f"run {run.pk} already {run.status}")
        now = timezone.now()
        Attempt.objects.filter(run=run, status=Attempt.Status.QUEUED).update(
            status=Attempt.Status.CANCELLED, reason="cancelled", finished_at=now
        )
        active = list(
            Attempt.objects.filter(run=run, status__in=ACTIVE).values_list("worker_id", "pk")
        )
        _stop(active)
        refresh_runs([run.pk])
    run.refresh_from_db()
    return run


def pending_stops(worker_id: int) -> list[int]:
    """Active attempts of a worker whose run is being cancelled (for a reconnect)."""
    return list(
        Attempt.objects.filter(
            worker_id=worker_id, status__in=ACTIVE, run__cancel_requested_at__isnull=False
        ).values_list("pk", flat=True)
    )


# --- pausing -------------------------------------------------------------------


def set_paused(paused: bool, by: str = "") -> SchedulerState:
    SchedulerState.current()
    SchedulerState.objects.filter(pk=1).update(
        paused=paused, paused_at=timezone.now() if paused else None, paused_by=by if paused else ""
    )
    if not paused:
        transaction.on_commit(lambda: work_queued.send(sender=Run))
    return SchedulerState.current()


def is_paused() -> bool:
    return SchedulerState.objects.filter(pk=1, paused=True).exists()


# --- output --------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    attempt_id: int
    seq: int
    stream: str
    data: str


def append_logs(worker_id: int, chunks: Sequence[Chunk]) -> tuple[dict[int, int], set[int]]:
    """Store a batch of output chunks in a few queries.

    Returns (attempt id -> highest seq now stored or skipped, refused attempt ids).
    Output beyond SCHEDULER_LOG_LIMIT_BYTES per attempt is dropped and the
    attempt marked truncated. Chunks for attempts that are not this worker's
    active ones are refused and change nothing.
    """
    if not chunks:
        return {}, set()
    ids = {c.attempt_id for c in chunks}
    stored = dict(
        Attempt.objects.filter(pk__in=ids, worker_id=worker_id, status__in=ACTIVE).values_list(
            "pk", "stored_bytes"
        )
    )
    refused = ids - stored.keys()
    limit = settings.SCHEDULER_LOG_LIMIT_BYTES
    rows: list[LogChunk] = []
    added: dict[int, int] = {}
    acked: dict[int, int] = {}
    truncated: set[int] = set()
    known = _known_seqs(chunks, stored.keys())
    for chunk in sorted(chunks, key=lambda c: (c.attempt_id, c.seq)):
        if chunk.attempt_id in refused:
            continue
        acked[chunk.attempt_id] = max(acked.get(chunk.attempt_id, -1), chunk.seq)
        if (chunk.attempt_id, chunk.seq) in known:
            continue  # a replay after a reconnect: stored already
        known.add((chunk.attempt_id, chunk.seq))
        room = limit - stored[chunk.attempt_id]
        data = chunk.data
        size = len(data.encode())
        if size > room:
            truncated.add(chunk.attempt_id)
            data = data.encode()[: max(room, 0)].decode(errors="ignore")
            size = len(data.encode())
            if not data:
                continue
        stored[chunk.attempt_id] += size
        added[chunk.attempt_id] = added.get(chunk.attempt_id, 0) + size
        rows.append(
            LogChunk(attempt_id=chunk.attempt_id, seq=chunk.seq, stream=chunk.stream, data=data)
        )
    with transaction.atomic():
        # The unique (attempt, seq) constraint is the last word on duplicates.
        LogChunk.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        for attempt_id, size in added.items():
            Attempt.objects.filter(pk=attempt_id).update(stored_bytes=F("stored_bytes") + size)
        if truncated:
            Attempt.objects.filter(pk__in=truncated).update(truncated=True)
    return acked, refused


def _known_seqs(chunks: Sequence[Chunk], attempt_ids) -> set[tuple[int, int]]:
    """(attempt, seq) pairs of this batch that are stored already: one query."""
    wanted = Q()
    for attempt_id in attempt_ids:
        seqs = [c.seq for c in chunks if c.attempt_id == attempt_id]
        wanted |= Q(attempt_id=attempt_id, seq__in=seqs)
    if not wanted:
        return set()
    return set(LogChunk.objects.filter(wanted).values_list("attempt_id", "seq"))


def output_of(attempt: Attempt) -> dict[str, str]:
    """stdout, stderr and both interleaved in order, with a marker when truncated."""
    parts: dict[str, list[str]] = {"stdout": [], "stderr": [], "combined": []}
    for stream, data in attempt.log_chunks.order_by("seq").values_list("stream", "data"):
        parts[stream].append(data)
        parts["combined"].append(data)
    text = {key: "".join(value) for key, value in parts.items()}
    if attempt.truncated:
        marker = truncation_marker(attempt)
        text = {key: value + marker for key, value in text.items()}
    return text


def truncation_marker(attempt: Attempt) -> str:
    return (
        f"\n[output truncated: kept {attempt.stored_bytes} of "
        f"{max(attempt.output_bytes, attempt.stored_bytes)} bytes]\n"
    )
