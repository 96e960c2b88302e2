"""Retention: runs, their output and events older than SCHEDULER_RETENTION_DAYS go.

The service calls `prune` once a tick; each call deletes at most one batch
(SCHEDULER_RETENTION_BATCH runs, with their attempts, output chunks and
notification deliveries, in one transaction; then events, in a batch ten
times bigger), so that the writer's thread, which the duties share with
dispatch, is never held for long. A backlog (retention just turned on over
years of history) is worked off a batch a tick.

Only final runs that ended before the cutoff are deleted, found by the
run_finished_at index: a queued or running run is never touched however old,
nor a run that ended after the cutoff. A newer run that retried an old one
keeps living, its retry_of link cleared (the database would refuse the
dangling key anyway). The audit log is kept whatever its age (README,
Audit); DeletedTask rows are kept (one small row per deleted task: its name
for the runs that remain). Several servers may prune at once: a row deleted
by one is simply not deleted again by the other.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from tasks_app.models import Attempt, Delivery, Event, LogChunk, Run

EVENTS_PER_RUN = 10


def cutoff(now=None) -> dt.datetime | None:
    """What ended before this is deleted; None: everything is kept."""
    days = settings.SCHEDULER_RETENTION_DAYS
    if not days:
        return None
    return (now or timezone.now()) - dt.timedelta(days=days)


def prune(now=None, batch: int | None = None) -> int:
    """Delete one batch of old runs (with what hangs off them) and of old
    events; how many rows of runs and events went."""
    limit = cutoff(now)
    if limit is None:
        return 0
    batch = batch or settings.SCHEDULER_RETENTION_BATCH
    return _prune_runs(limit, batch) + _prune_events(limit, batch * EVENTS_PER_RUN)


def _prune_runs(limit: dt.datetime, batch: int) -> int:
    old = (
        Run.objects.filter(finished_at__lt=limit, status__in=Run.FINAL)
        .order_by("finished_at")
        .values_list("id", flat=True)
    )
    with transaction.atomic():
        if connection.features.has_select_for_update_skip_locked:
            # Race: another server pruning at once takes the next batch, not this one.
            old = old.select_for_update(skip_locked=True)
        ids = list(old[:batch])
        if not ids:
            return 0
        # Children first, each one statement by the run ids, instead of the
        # ORM's collector reading every attempt and chunk into memory. A final
        # run stays final, so nothing read above changes meanwhile.
        Run.objects.filter(retry_of_id__in=ids).exclude(id__in=ids).update(retry_of=None)
        LogChunk.objects.filter(attempt__run_id__in=ids)._raw_delete(LogChunk.objects.db)
        Attempt.objects.filter(run_id__in=ids)._raw_delete(Attempt.objects.db)
        Delivery.objects.filter(run_id__in=ids)._raw_delete(Delivery.objects.db)
        return Run.objects.filter(id__in=ids)._raw_delete(Run.objects.db)


def _prune_events(limit: dt.datetime, batch: int) -> int:
    ids = list(
        Event.objects.filter(at__lt=limit).order_by("at").values_list("id", flat=True)[:batch]
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
