"""Retention: runs, their output and events older than SCHEDULER_RETENTION_DAYS go.

The service calls `prune` once a tick; each call deletes at most one batch
(SCHEDULER_RETENTION_BATCH runs, with their attempts, output chunks and
notification deliveries, in one transaction; once no old run is left, old
events, five times as many), so that the writer's thread, which the duties
share with dispatch, is never held for long. A backlog (retention just turned on over
years of history) is worked off a batch a tick.

Only final runs that ended before the cutoff are deleted, found by the
run_finished index (finished_at, status): a queued or running run is never touched however old,
nor a run that ended after the cutoff. A newer run that retried an old one
keeps living, its retry_of link cleared (the database would refuse the
dangling key anyway). The audit log is kept whatever its age (README,
Audit); DeletedTask rows are kept (one small row per deleted task: its name
for the runs that remain). Several servers may prune at once: a row deleted
by one is simply not deleted again by the other.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from tasks_app.models import Attempt, Delivery, Event, LogChunk, Run

# Events deleted per call, per run of a batch: an event row is smaller than a
# run with its attempts and output (measured: 500 runs, 2,500 rows, in ~48 ms
# on SQLite; 2,500 events in ~28 ms).
EVENTS_PER_BATCH = 5

# Once a batch found nothing, the next waits this long (seconds).
IDLE_S = 60.0

log = logging.getLogger(__name__)


def cutoff(now=None) -> dt.datetime | None:
    """What ended before this is deleted; None: everything is kept."""
    days = settings.SCHEDULER_RETENTION_DAYS
    if not days:
        return None
    return (now or timezone.now()) - dt.timedelta(days=days)


def prune(now=None, batch: int | None = None) -> int:
    """Delete one batch: old runs (with what hangs off them), or, once none is
    left, old events; how many runs or events went."""
    limit = cutoff(now)
    if limit is None:
        return 0
    batch = batch or settings.SCHEDULER_RETENTION_BATCH
    # One batch a call: runs first, their events once no old run is left.
    return _prune_runs(limit, batch) or _prune_events(limit, batch * EVENTS_PER_BATCH)


def _prune_runs(limit: dt.datetime, batch: int) -> int:
    # By finished_at alone, so that the planner takes its index (given the
    # status too, SQLite chose the status index and sorted: 150 ms a batch at
    # 100,000 runs instead of 1). Only a final run has an end; the status is
    # checked on what was read all the same.
    old = Run.objects.filter(finished_at__lt=limit).order_by("finished_at")
    with transaction.atomic():
        if connection.features.has_select_for_update_skip_locked:
            # Race: another server pruning at once takes the next batch, not this one.
            old = old.select_for_update(skip_locked=True)
        ids = [pk for pk, status in old.values_list("id", "status")[:batch] if status in Run.FINAL]
        if not ids:
            return 0
        # Children first, each one statement by the run ids, instead of the
        # ORM's collector reading every attempt and chunk into memory. A final
        # run stays final, so nothing read above changes meanwhile.
        Run.objects.filter(retry_of_id__in=ids).exclude(id__in=ids).update(retry_of=None)
        # A plain IN (subquery) on the attempts' run index, then the chunks'
        # (attempt, seq) index; `attempt__run_id` would join the chunks to
        # themselves (measured on PostgreSQL: 370 ms a batch against ~10).
        attempts = Attempt.objects.filter(run_id__in=ids).values("id")
        LogChunk.objects.filter(attempt_id__in=attempts)._raw_delete(LogChunk.objects.db)
        Attempt.objects.filter(run_id__in=ids)._raw_delete(Attempt.objects.db)
        Delivery.objects.filter(run_id__in=ids)._raw_delete(Delivery.objects.db)
        return Run.objects.filter(id__in=ids)._raw_delete(Run.objects.db)


def _prune_events(limit: dt.datetime, batch: int) -> int:
    # The events of a run still kept (queued or running for longer than the
    # window, or ended after the cutoff) stay with it: its timeline has no
    # holes. They go once their run has (a probe of its primary key each).
    kept_run = Run.objects.filter(pk=OuterRef("run_id"))
    ids = list(
        Event.objects.filter(at__lt=limit)
        .exclude(Exists(kept_run))
        .order_by("at")
        .values_list("id", flat=True)[:batch]
    )
    if not ids:
        # Operators' alerts (no run) age out with the events.
        old = Delivery.objects.filter(run_id__isnull=True, created_at__lt=limit)
        return old._raw_delete(Delivery.objects.db)
    return Event.objects.filter(id__in=ids)._raw_delete(Event.objects.db)


def kept(now=None) -> dict:
    """What the server keeps, for the overview and the runs page: the days of
    history (0: all) and when the oldest run stored was created."""
    oldest = Run.objects.order_by("id").values_list("created_at", flat=True).first()
    return {"days": settings.SCHEDULER_RETENTION_DAYS, "oldest_run_at": oldest}


class Pruner:
    """Runs `prune` on a thread of its own, one batch at a time.

    A batch of 500 runs took ~100 ms on PostgreSQL here (half of it the
    commit's flush): on the writer's thread, that much dispatch would wait
    each tick of a backlog. On its own thread it waits for nothing on
    PostgreSQL (it only locks rows nobody else touches). On SQLite (~50 ms a
    batch) it runs on the caller's thread: the one write lock is taken
    whichever thread asks.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="retention")
        self._future: Future | None = None
        self._resume_at = 0.0

    def step(self) -> bool:
        """Start the next batch unless one is going or the last found nothing
        less than IDLE_S ago; whether the last batch (finished since the
        previous step) deleted anything."""
        if not connection.features.has_select_for_update_skip_locked:
            # SQLite: a batch takes the one write lock on any thread, so it
            # runs here (a thread would only add a writer that waits, and
            # one that outlives a test's transaction).
            if time.monotonic() < self._resume_at:
                return False
            found = bool(prune())
            if not found:
                self._resume_at = time.monotonic() + IDLE_S
            return found
        future = self._future
        if future is not None and not future.done():
            return False
        found = False
        if future is not None:
            self._future = None
            try:
                found = bool(future.result())
            except Exception:
                log.exception("retention batch failed")
            if not found:
                # Caught up: old rows appear a few at a time, look now and then.
                self._resume_at = time.monotonic() + IDLE_S
        if time.monotonic() >= self._resume_at:
            self._future = self._pool.submit(self._batch)
        return found

    @staticmethod
    def _batch() -> int:
        from django.db import connection

        try:
            return prune()
        finally:
            connection.close()

    def wait(self, timeout: float = 30.0) -> None:
        """Until the batch under way is done (tests, shutdown)."""
        if self._future is not None:
            self._future.exception(timeout)
