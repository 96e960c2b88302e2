"""Metrics of the run lifecycle (README, "Metrics and health").

Counters and histograms are observed by lifecycle where the change happens,
once per batch, from values its statements already hold (no query of their
own), after the transaction commits: a rolled-back batch (the writer retries
its jobs one by one after a failure) counts nothing, and a retried one counts
once. They belong to this server process; Prometheus sums the processes.

The queue's gauges are the whole install's, read from the database when
/metrics is scraped (QueueCollector): one count and one probe per label set,
on the queue index, never a pass over queued rows in Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter as Tally
from collections.abc import Iterable

from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler_site.metrics import REGISTRY
from tasks_app.batchsql import aware, select, table
from tasks_app.models import Attempt

log = logging.getLogger(__name__)

# Created-to-started is a few milliseconds on an idle agent (the design's
# target: p50 1-2 ms, p99 under 10 ms); a busy queue stretches it to minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
)  # fmt: skip
# From `true` (milliseconds) to nightly jobs (hours).
DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400,
)  # fmt: skip

RUNS_FINISHED = Counter(
    "scheduler_runs_finished",
    "Runs that reached a final status (succeeded, failed, cancelled, skipped), by task name.",
    ["task", "status"],
    registry=REGISTRY,
)
ATTEMPTS_LOST = Counter(
    "scheduler_attempts_lost",
    "Attempts the master declared lost (their worker went silent, or came back without them).",
    registry=REGISTRY,
)
ATTEMPTS_RETRIED = Counter(
    "scheduler_attempts_retried",
    "Retries queued, by how the try before ended (failed, timed_out, lost).",
    ["after"],
    registry=REGISTRY,
)
START_LATENCY = Histogram(
    "scheduler_start_latency_seconds",
    "From an attempt being ready to go (its run created; a retry's backoff, a delayed run's"
    " time or a concurrency limit's wait over) to its process started on an agent.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    "scheduler_run_duration_seconds",
    "From a run's first process started to the run's final status, by that status.",
    ["status"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)


def _after_commit(observe) -> None:
    transaction.on_commit(observe, robust=True)


def runs_finished(finals: Iterable[tuple[str, str, dt.datetime | None, dt.datetime | None]]):
    """(task name, status, started, finished) of runs that just became final."""
    finals = list(finals)
    if not finals:
        return

    def observe() -> None:
        for (task, status), count in Tally((task, status) for task, status, _, _ in finals).items():
            RUNS_FINISHED.labels(task, status).inc(count)
        for _, status, started, finished in finals:
            if started is not None and finished is not None:
                RUN_DURATION.labels(status).observe(max((finished - started).total_seconds(), 0))

    _after_commit(observe)


def attempts_started(waits: list[float]) -> None:
    """Seconds each attempt that just started had been ready for."""
    if waits:
        _after_commit(lambda: [START_LATENCY.observe(max(wait, 0.0)) for wait in waits])


def attempts_lost(count: int) -> None:
    if count:
        _after_commit(lambda: ATTEMPTS_LOST.inc(count))


def attempts_retried(after: Iterable[str]) -> None:
    """The statuses of the tries that just got a retry queued."""
    tally = Tally(after)
    if tally:
        _after_commit(lambda: [ATTEMPTS_RETRIED.labels(s).inc(n) for s, n in tally.items()])


class QueueCollector(Collector):
    """Queue depth and the age of the oldest ready attempt, read at scrape time."""

    def describe(self):
        # What collect() yields, without the queries: the registry asks at
        # registration (at import, before the database may be read).
        return self._families()

    def collect(self):
        depth, oldest, reachable = self._families()
        try:
            count, age = queue_figures()
        except DatabaseError as exc:
            log.warning("metrics: the database could not be read: %s", exc)
            reachable.add_metric([], 0)
            yield reachable
            return
        depth.add_metric([], count)
        oldest.add_metric([], age)
        reachable.add_metric([], 1)
        yield from (depth, oldest, reachable)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        depth = GaugeMetricFamily(
            "scheduler_queue_depth",
            "Queued attempts, all of them: ready, waiting for a backoff or a delayed run's time,"
            " or held by their task's concurrency limit.",
        )
        oldest = GaugeMetricFamily(
            "scheduler_queue_oldest_age_seconds",
            "How long the attempt at the head of a label set's queue has been ready to go and"
            " not taken, the longest over label sets (0 when none is ready).",
        )
        reachable = GaugeMetricFamily(
            "scheduler_metrics_database_up",
            "1 when this scrape could read the database; 0 and no database-wide gauges otherwise.",
        )
        return depth, oldest, reachable


def queue_figures() -> tuple[int, float]:
    """(queued attempts, seconds the oldest ready head of a label set has waited)."""
    attempt = table(Attempt)
    queued = Attempt.Status.QUEUED
    now = timezone.now()
    at = connection.ops.adapt_datetimefield_value(now)
    ((count,),) = select(f"SELECT COUNT(*) FROM {attempt} WHERE status = %s", [queued])
    if not count:
        return 0, 0.0
    # The label sets by a loose index scan of the queue index (as dispatch reads
    # them), then each one's head in queue order: what dispatch would take next.
    # Bounded by queue_at <= now as dispatch is: held and far-delayed rows are
    # never read.
    heads = select(
        f"""
        WITH RECURSIVE k(key) AS (
            SELECT MIN(labels_key) FROM {attempt} WHERE status = %s
            UNION ALL
            SELECT (SELECT MIN(labels_key) FROM {attempt} WHERE status = %s AND labels_key > k.key)
            FROM k WHERE k.key IS NOT NULL
        )
        SELECT (SELECT a.ready_at FROM {attempt} a
                WHERE a.status = %s AND a.labels_key = k.key AND a.queue_at <= %s
                AND a.ready_at <= %s ORDER BY a.queue_at, a.id LIMIT 1)
        FROM k WHERE k.key IS NOT NULL
        """,
        [queued, queued, queued, at, at],
    )
    ready = [_datetime(value) for (value,) in heads if value is not None]
    return count, max((now - min(ready)).total_seconds(), 0.0) if ready else 0.0


def _datetime(value) -> dt.datetime:
    # SQLite hands a subquery's value back as text: it loses its column's type.
    return aware(parse_datetime(value) if isinstance(value, str) else value)


REGISTRY.register(QueueCollector())
