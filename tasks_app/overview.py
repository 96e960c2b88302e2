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


def finished_series(series: Series, now: datetime, rows=None) -> list[Bucket]:
    """Runs finished per bucket by final status: one GROUP BY (bucket, status)
    over the window's rows, read by the run_finished index. `rows`: the
    window's (bucket, status, count) already read (day_rollup's)."""
    start = series.start(now)
    if rows is None:
        # Only a final run has a finished_at: no status filter needed.
        rows = (
            Run.objects.filter(finished_at__gte=start)
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
        if 0 <= index < series.count and status in FINAL:
            counts = buckets[index].counts
            counts[status] = counts.get(status, 0) + n
    return buckets


class DayRollup:
    """The last day's finished runs counted per (hour, task, status) in one
    GROUP BY: the day's chart and the task table both add these up, so the
    day's rows are read once for the two (the page's most costly read)."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.since = LAST_DAY.start(now)
        self.rows = list(
            Run.objects.filter(finished_at__gte=self.since)
            .annotate(bucket=TruncHour("finished_at", tzinfo=UTC))
            .values_list("bucket", "task_id", "status")
            .annotate(n=Count("id"), name=Max("task_name"))
            .order_by()
        )

    def series(self) -> list[Bucket]:
        return finished_series(
            LAST_DAY, self.now, [(bucket, status, n) for bucket, _, status, n, _ in self.rows]
        )


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


def task_health(now: datetime, limit: int = TOP_TASKS, rollup: DayRollup | None = None):
    """The tasks with the most runs finished in the last day's window, busiest
    first, each with its success rate and duration p50/p95 there."""
    rollup = rollup or DayRollup(now)
    by_id: dict = {}
    for _, task_id, status, n, name in rollup.rows:
        health = by_id.get(task_id)
        if health is None:
            health = by_id[task_id] = TaskHealth(task_id, name, 0, 0, 0)
        health.name = max(health.name, name)  # the task's latest name, as Max() says
        health.runs += n
        if status == Run.Status.SUCCEEDED:
            health.succeeded += n
        elif status == Run.Status.FAILED:
            health.failed += n
    top = sorted(by_id.values(), key=lambda h: (-h.runs, h.name))[:limit]
    ids = [h.task_id for h in top]
    if connection.vendor == "postgresql":
        found = _percentiles_postgres(ids, rollup.since)
    else:
        found = _percentiles_sampled(ids, rollup.since)
    for health in top:
        health.p50, health.p95 = found.get(health.task_id, (None, None))
    return top


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
