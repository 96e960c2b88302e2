"""What the overview page says about runs: now, the last hour and day, per task.

Every figure is aggregated by the database (COUNT ... GROUP BY a time bucket
or a task), never by a Python loop over runs: the page costs what its windows
hold, read off the (finished_at) and (status, -id) indexes, not the history's
length. Percentiles: PostgreSQL computes them (percentile_cont); SQLite has
no such aggregate, so they are computed here over a bounded sample, each
task's newest SAMPLE runs of the window, with the same linear interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import Count, F, Max, Q, Window
from django.db.models.functions import RowNumber, TruncHour, TruncMinute

from tasks_app.charts import Bucket
from tasks_app.models import Run

# The chart's stacks, bottom up: how finished runs ended.
FINAL = [s.value for s in Run.FINAL]
# Succeeded or failed: what a success rate and durations are about (a
# cancelled or skipped run says nothing about the task's health).
COUNTED = (Run.Status.SUCCEEDED, Run.Status.FAILED)
TASK_WINDOW = timedelta(hours=24)
TOP_TASKS = 20
# SQLite's percentile sample: each task's newest runs of the window.
SAMPLE = 1000
LATEST_FAILURES = 10


def now_counts() -> dict[str, int]:
    """Runs queued and running now: two counts off the (status, -id) index."""
    found = dict(
        Run.objects.filter(status__in=(Run.Status.QUEUED, Run.Status.RUNNING))
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {"queued": found.get("queued", 0), "running": found.get("running", 0)}


@dataclass(frozen=True)
class Series:
    """A chart's window: `count` buckets of `step`, the last one holding now."""

    name: str
    step: timedelta
    count: int
    trunc: type

    def start(self, now: datetime) -> datetime:
        now = now.astimezone(UTC)
        if self.step == timedelta(minutes=1):
            floor = now.replace(second=0, microsecond=0)
        else:
            floor = now.replace(minute=0, second=0, microsecond=0)
        return floor - (self.count - 1) * self.step

    def label(self, start: datetime) -> str:
        return (
            f"{start:%H:%M} UTC" if self.step < timedelta(hours=1) else f"{start:%d %b %H:00} UTC"
        )


LAST_HOUR = Series("hour", timedelta(minutes=1), 60, TruncMinute)
LAST_DAY = Series("day", timedelta(hours=1), 24, TruncHour)


def finished_series(series: Series, now: datetime) -> list[Bucket]:
    """Runs finished per bucket by final status: one GROUP BY (bucket, status)
    over the window's rows, read by the run_finished index."""
    start = series.start(now)
    rows = (
        Run.objects.filter(finished_at__gte=start, status__in=FINAL)
        .annotate(bucket=series.trunc("finished_at", tzinfo=UTC))
        .values_list("bucket", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    buckets = [
        Bucket(start + i * series.step, series.label(start + i * series.step))
        for i in range(series.count)
    ]
    for bucket_start, status, n in rows:
        index = int((bucket_start.astimezone(UTC) - start) / series.step)
        if 0 <= index < series.count:
            buckets[index].counts[status] = n
    return buckets


@dataclass
class TaskHealth:
    task_id: int | None
    name: str
    runs: int
    succeeded: int
    failed: int
    p50: timedelta | None = None
    p95: timedelta | None = None

    @property
    def success_rate(self) -> float | None:
        counted = self.succeeded + self.failed
        return 100.0 * self.succeeded / counted if counted else None


def task_health(now: datetime, limit: int = TOP_TASKS) -> list[TaskHealth]:
    """The tasks with the most runs finished in the window, busiest first,
    each with its success rate and duration p50/p95 there."""
    rows = (
        Run.objects.filter(finished_at__gte=now - TASK_WINDOW, status__in=FINAL)
        .values("task_id")
        .annotate(
            name=Max("task_name"),
            runs=Count("id"),
            succeeded=Count("id", filter=Q(status=Run.Status.SUCCEEDED)),
            failed=Count("id", filter=Q(status=Run.Status.FAILED)),
        )
        .order_by("-runs", "name")[:limit]
    )
    health = [TaskHealth(**row) for row in rows]
    by_id = {h.task_id: h for h in health}
    if connection.vendor == "postgresql":
        found = _percentiles_postgres(list(by_id), now - TASK_WINDOW)
    else:
        found = _percentiles_sampled(list(by_id), now - TASK_WINDOW)
    for task_id, (p50, p95) in found.items():
        by_id[task_id].p50, by_id[task_id].p95 = p50, p95
    return health


def _percentiles_postgres(task_ids: list, since: datetime) -> dict:
    if not task_ids:
        return {}
    ids = [i for i in task_ids if i is not None]
    table = Run._meta.db_table
    # The task_id IS NULL arm: runs of no task (none today) still get a row.
    sql = f"""
        SELECT task_id,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY finished_at - started_at),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY finished_at - started_at)
          FROM {table}
         WHERE finished_at >= %s AND status = ANY(%s) AND started_at IS NOT NULL
           AND (task_id = ANY(%s) OR (%s AND task_id IS NULL))
         GROUP BY task_id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [since, [str(s) for s in COUNTED], ids, None in task_ids])
        return {task_id: (p50, p95) for task_id, p50, p95 in cursor.fetchall()}


def _percentiles_sampled(task_ids: list, since: datetime) -> dict:
    """One query: each task's newest SAMPLE counted runs of the window
    (ROW_NUMBER() over the task, newest first), percentiles computed here."""
    if not task_ids:
        return {}
    ids = [i for i in task_ids if i is not None]
    which = Q(task_id__in=ids) | Q(task_id__isnull=True) if None in task_ids else Q(task_id__in=ids)
    sample = (
        Run.objects.filter(which, finished_at__gte=since, status__in=COUNTED)
        .filter(started_at__isnull=False)
        .annotate(rank=Window(RowNumber(), partition_by=[F("task_id")], order_by=F("id").desc()))
        .filter(rank__lte=SAMPLE)
        .values_list("task_id", "started_at", "finished_at")
    )
    durations: dict = {}
    for task_id, started, finished in sample:
        durations.setdefault(task_id, []).append((finished - started).total_seconds())
    found = {}
    for task_id, values in durations.items():
        values.sort()
        found[task_id] = (
            timedelta(seconds=percentile_cont(values, 0.5)),
            timedelta(seconds=percentile_cont(values, 0.95)),
        )
    return found


def percentile_cont(ordered: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont over an ascending list: the value at
    position fraction * (n - 1), interpolated between its two neighbours, so
    both engines say the same for the same runs."""
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latest_failures(limit: int = LATEST_FAILURES) -> list[Run]:
    """The newest failed runs, off the (status, -id) index."""
    return list(
        Run.objects.filter(status=Run.Status.FAILED)
        .order_by("-id")
        .only("id", "task_id", "task_name", "reason", "finished_at", "started_at")[:limit]
    )
