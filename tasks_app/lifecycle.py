"""The run lifecycle: trigger, assign, start, log, finish, lose.

Every transition is one conditional UPDATE whose row count says who won, so
two consumers, a consumer and the service, or two server processes can never
both apply it. Callers translate frames and requests into these calls.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from django.conf import settings
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from tasks_app.exceptions import TaskDisabled
from tasks_app.models import Attempt, LogChunk, Run, Task
from tasks_app.signals import work_queued

ACTIVE = Attempt.ACTIVE
FINAL_ATTEMPT = Attempt.FINAL


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value, tz=dt.UTC)


def trigger_run(task: Task, trigger: str = Run.Trigger.MANUAL, user=None) -> Run:
    """Create a run with a snapshot of the task and queue its first attempt."""
    if not task.enabled:
        raise TaskDisabled(f"task {task.name!r} is disabled")
    with transaction.atomic():
        run = Run.objects.create(
            task=task,
            task_name=task.name,
            definition=task.definition(),
            trigger=trigger,
            created_by=user if user is not None and user.is_authenticated else None,
        )
        Attempt.objects.create(run=run, shard_index=0, try_number=1)
        transaction.on_commit(lambda: work_queued.send(sender=Run))
    return run


def assign(attempt_id: int, worker_id: int, worker_name: str) -> bool:
    """queued -> assigned. False when someone else got it first."""
    # Race: two dispatchers picking the same queued attempt; only one UPDATE matches.
    return bool(
        Attempt.objects.filter(pk=attempt_id, status=Attempt.Status.QUEUED).update(
            status=Attempt.Status.ASSIGNED,
            worker_id=worker_id,
            worker_name=worker_name,
            assigned_at=timezone.now(),
        )
    )


def requeue(worker_id: int, attempt_ids: Iterable[int]) -> int:
    """assigned -> queued, for assignments an agent refused or never received."""
    # Race: the agent may report "started" concurrently; only still-assigned rows move.
    return Attempt.objects.filter(
        pk__in=list(attempt_ids), worker_id=worker_id, status=Attempt.Status.ASSIGNED
    ).update(status=Attempt.Status.QUEUED, worker=None, assigned_at=None)


def mark_started(
    worker_id: int, attempt_id: int, started_at: float | None, pid: int | None
) -> bool:
    """assigned -> running; only the worker the attempt is assigned to may say so."""
    updated = Attempt.objects.filter(
        pk=attempt_id, worker_id=worker_id, status=Attempt.Status.ASSIGNED
    ).update(
        status=Attempt.Status.RUNNING,
        started_at=_from_epoch(started_at) or timezone.now(),
        pid=pid,
    )
    if updated:
        run_id = Attempt.objects.filter(pk=attempt_id).values_list("run_id", flat=True).first()
        # Race: two shards starting at once; the first one moves the run.
        Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
            status=Run.Status.RUNNING, started_at=_from_epoch(started_at) or timezone.now()
        )
    return bool(updated)


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
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
        if not updated:
            known = Attempt.objects.filter(pk=attempt_id, worker_id=worker_id).exists()
            return Outcome.DUPLICATE if known else Outcome.UNKNOWN
        run_id = Attempt.objects.filter(pk=attempt_id).values_list("run_id", flat=True).get()
        refresh_runs([run_id])
    return Outcome.STORED


def mark_lost(worker_id: int, reason: str, keep: Sequence[int] = ()) -> list[int]:
    """Every active attempt of a worker, except those in keep, becomes lost."""
    with transaction.atomic():
        query = Attempt.objects.filter(worker_id=worker_id, status__in=ACTIVE).exclude(
            pk__in=list(keep)
        )
        rows = list(query.values_list("pk", "run_id"))
        if not rows:
            return []
        # Race: a finished report arriving now; status__in=ACTIVE keeps whichever came first.
        Attempt.objects.filter(pk__in=[pk for pk, _ in rows], status__in=ACTIVE).update(
            status=Attempt.Status.LOST, reason=reason[:500], finished_at=timezone.now()
        )
        refresh_runs({run_id for _, run_id in rows})
    return [pk for pk, _ in rows]


def refresh_runs(run_ids: Iterable[int]) -> None:
    """Recompute each run's status from the latest attempt of each shard."""
    run_ids = list(run_ids)
    latest: dict[int, dict[int, Attempt]] = {}
    for attempt in Attempt.objects.filter(run_id__in=run_ids).only(
        "run_id", "shard_index", "try_number", "status", "started_at", "finished_at"
    ):
        shards = latest.setdefault(attempt.run_id, {})
        current = shards.get(attempt.shard_index)
        if current is None or attempt.try_number > current.try_number:
            shards[attempt.shard_index] = attempt
    for run_id, shards in latest.items():
        attempts = list(shards.values())
        statuses = {a.status for a in attempts}
        started = [a.started_at for a in attempts if a.started_at]
        if statuses <= set(FINAL_ATTEMPT):
            if statuses == {Attempt.Status.SUCCEEDED}:
                status = Run.Status.SUCCEEDED
            elif Attempt.Status.CANCELLED in statuses:
                status = Run.Status.CANCELLED
            else:
                status = Run.Status.FAILED
            finished = max(
                (a.finished_at for a in attempts if a.finished_at), default=timezone.now()
            )
            # Race: only a run that is not final yet can be finished, once.
            Run.objects.filter(pk=run_id).exclude(status__in=Run.FINAL).update(
                status=status, finished_at=finished, started_at=min(started) if started else None
            )
        elif statuses & {Attempt.Status.RUNNING, *FINAL_ATTEMPT}:
            Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
                status=Run.Status.RUNNING, started_at=min(started) if started else timezone.now()
            )


@dataclass(frozen=True)
class Chunk:
    attempt_id: int
    seq: int
    stream: str
    data: str


def append_logs(worker_id: int, chunks: Sequence[Chunk]) -> set[int]:
    """Store a batch of output chunks in a few queries; returns refused attempt ids.

    Output beyond SCHEDULER_LOG_LIMIT_BYTES per attempt is dropped and the
    attempt marked truncated. Chunks for attempts that are not this worker's
    active ones are refused and change nothing.
    """
    if not chunks:
        return set()
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
    truncated: set[int] = set()
    for chunk in sorted(chunks, key=lambda c: (c.attempt_id, c.seq)):
        if chunk.attempt_id in refused:
            continue
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
        # A replayed chunk hits the (attempt, seq) unique constraint and is skipped.
        LogChunk.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        for attempt_id, size in added.items():
            Attempt.objects.filter(pk=attempt_id).update(stored_bytes=F("stored_bytes") + size)
        if truncated:
            Attempt.objects.filter(pk__in=truncated).update(truncated=True)
    return refused


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
