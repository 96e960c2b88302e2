"""Fan-out and fan-in: a run's shards, its merge attempt, and its state from them.

A run of N shards (definition["shards"], never the task's field: a broadcast
run sets its own count at trigger time) has attempts with shard_index
0..N-1; each shard is retried alone. Once every shard succeeded and the run
has a merge command, one more "shard" is queued: the merge, shard_index N.
Its attempts are dispatched and retried like any other; what marks them is
only their index, so dispatch, retries and the unique (run, shard, try)
constraint need nothing new for them.

Nothing here writes: lifecycle.refresh_runs reads the latest attempt of each
shard (one query per batch of runs) and asks `verdict()` what the run is now.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from tasks_app.models import Attempt, Run, labels_key

S = Attempt.Status


def shard_count(definition: dict) -> int:
    """How many shards a run has (runs from before fan-out have one)."""
    return int(definition.get("shards") or 1)


def has_merge(definition: dict) -> bool:
    return bool(definition.get("merge_command"))


def is_merge(definition: dict, shard_index: int) -> bool:
    """The merge attempt is the one past the last shard."""
    return has_merge(definition) and shard_index >= shard_count(definition)


def first_attempts(
    run: Run, routes: list[tuple[int, str]], ready: dt.datetime, now: dt.datetime
) -> list[Attempt]:
    """The attempts a new run starts with: one per shard, each ready at `ready`.

    routes: (shard index, labels key) of each, from tasks_app.routing (a
    pinned or broadcast shard's key names its worker). The one place a run's
    first attempts are made (lifecycle._queue inserts them, all runs' at
    once, in one batched INSERT).
    """
    definition = run.definition
    timeout = definition.get("timeout")
    priority = definition.get("priority", 0)
    return [
        Attempt.queued(
            run=run,
            shard_index=index,
            labels_key=key,
            timeout_s=timeout,
            ready=ready,
            now=now,
            priority=priority,
        )
        for index, key in routes
    ]


def merge_attempt(run_id: int, definition: dict, now: dt.datetime) -> Attempt:
    """The first try of a run's merge (shard_index = the shard count). It goes
    to any worker with the task's labels, also after a broadcast."""
    return Attempt.queued(
        run_id=run_id,
        shard_index=shard_count(definition),
        labels_key=labels_key(definition.get("labels")),
        timeout_s=definition.get("timeout"),
        ready=now,
        now=now,
        priority=definition.get("priority", 0),
    )


@dataclass(frozen=True)
class Latest:
    """The latest attempt of one shard, as refresh_runs reads it."""

    shard_index: int
    try_number: int
    status: str
    reason: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class Verdict:
    """What a run is, from its shards: a status (None: not final yet), and
    whether to queue the merge or to stop the shards still going (fail fast)."""

    status: str | None
    reason: str = ""
    queue_merge: bool = False
    fail_fast: bool = False


def _tries(n: int) -> str:
    return f"{n} attempt{'s' if n > 1 else ''}"


def verdict(definition: dict, latest: dict[int, Latest], cancelling: bool) -> Verdict:
    """The run's state from the latest attempt of each of its shards (and merge).

    Fail fast: a shard that ended badly with no retry left (its latest attempt
    is final and not succeeded: lifecycle queues the retry before asking this)
    fails the run at once, while other shards may still be queued or running:
    the run cannot succeed any more, so the caller cancels what is queued and
    stops what runs rather than let them hold slots for nothing.
    """
    count = shard_count(definition)
    final = set(Attempt.FINAL)
    shards = [a for index, a in latest.items() if index < count]
    merge = latest.get(count) if has_merge(definition) else None
    statuses = {a.status for a in shards}
    all_final = len(shards) == count and statuses <= final
    merge_final = merge is None or merge.status in final
    succeeded = all_final and statuses == {S.SUCCEEDED}
    if cancelling or S.CANCELLED in statuses:
        # What was cancelled never runs again: the run ends once nothing of it
        # is left going; one that got everything done before the cancel took
        # effect still succeeded.
        if not (all_final and merge_final):
            return Verdict(None)
        if succeeded and (not has_merge(definition) or (merge and merge.status == S.SUCCEEDED)):
            return Verdict(Run.Status.SUCCEEDED)
        return Verdict(Run.Status.CANCELLED)
    bad = sorted(
        (a for a in shards if a.status in final and a.status != S.SUCCEEDED),
        key=lambda a: a.shard_index,
    )
    if bad:
        first = bad[0]
        why = f"{first.reason or first.status} (after {_tries(first.try_number)})"
        if count > 1:
            why = f"shard {first.shard_index} of {count} failed: {why}"
        return Verdict(Run.Status.FAILED, why, fail_fast=not all_final)
    if not succeeded:
        return Verdict(None)
    if not has_merge(definition):
        return Verdict(Run.Status.SUCCEEDED)
    if merge is None:
        return Verdict(None, queue_merge=True)
    if merge.status == S.SUCCEEDED:
        return Verdict(Run.Status.SUCCEEDED)
    if merge.status in final:
        why = f"merge failed: {merge.reason or merge.status} (after {_tries(merge.try_number)})"
        return Verdict(Run.Status.FAILED, why)
    return Verdict(None)


def latest_by_shard(attempts) -> dict[int, Attempt]:
    """The latest try of each shard (and of the merge), from attempts already read."""
    latest: dict[int, Attempt] = {}
    for attempt in attempts:
        current = latest.get(attempt.shard_index)
        if current is None or attempt.try_number > current.try_number:
            latest[attempt.shard_index] = attempt
    return latest


def failing_index(latest: dict[int, Attempt], count: int) -> int | None:
    """The first shard (or else the merge, index `count`) whose latest try ended
    badly, as verdict() names it in a failed run's reason; None if none did."""
    bad = (S.FAILED, S.TIMED_OUT, S.LOST)
    return next((i for i in sorted(latest) if i <= count and latest[i].status in bad), None)


def _held_merge(worker_id: int, attempt_id: int) -> tuple[int, dict] | None:
    """(run id, definition) of the merge attempt `attempt_id` if this worker
    holds it (assigned or running); None otherwise: only that worker may read
    its run's shard outputs."""
    row = (
        Attempt.objects.filter(pk=attempt_id, worker_id=worker_id, status__in=Attempt.ACTIVE)
        .values_list("run_id", "shard_index", "run__definition")
        .first()
    )
    if row is None or not is_merge(row[2], row[1]):
        return None
    return row[0], row[2]


def merge_inputs(worker_id: int, attempt_id: int) -> list[int] | None:
    """The successful attempt of every shard, in shard order, whose stdout the
    merge attempt `attempt_id` reads; None unless this worker holds that merge
    attempt and every shard has succeeded."""
    held = _held_merge(worker_id, attempt_id)
    if held is None:
        return None
    from tasks_app.results import succeeded_attempt_ids  # results builds on this module

    run_id, definition = held
    count = shard_count(definition)
    ids = succeeded_attempt_ids(run_id, range(count))
    return ids if len(ids) == count else None


def merge_input(worker_id: int, attempt_id: int, index: int) -> int | None:
    """The successful attempt of shard `index`, whose stdout the merge attempt
    `attempt_id` reads, or None unless this worker holds that merge attempt."""
    held = _held_merge(worker_id, attempt_id)
    if held is None or not 0 <= index < shard_count(held[1]):
        return None
    return (
        Attempt.objects.filter(run_id=held[0], shard_index=index, status=S.SUCCEEDED)
        .values_list("pk", flat=True)
        .first()
    )
