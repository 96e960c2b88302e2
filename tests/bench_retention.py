"""Retention's cost per batch: seed old runs, then prune them a batch at a time.

    SCHEDULER_DATA_DIR=/tmp/bench-retention .venv/bin/python -m tests.bench_retention \\
        [--runs 100000] [--batch 500] [--chunks 3]

On the database the environment names (SQLite in the data dir, or
DATABASE_URL): migrates it, seeds --runs finished runs spread over ten years
(`manage.py seedruns`, one attempt each) with --chunks output chunks per
attempt and a run.finished event per run, then calls tasks_app.retention.prune
until nothing is left to delete, timing each call (one call is what one
service tick does). Prints one JSON object: the batches, milliseconds per
batch (p50, p95, max), rows deleted per second. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=3)
    args = parser.parse_args(argv)
    if "SCHEDULER_DATA_DIR" not in os.environ:
        parser.error("set SCHEDULER_DATA_DIR to a scratch directory (its database is filled)")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
    os.environ.setdefault("SCHEDULER_RETENTION_DAYS", "30")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    from tasks_app import batchsql, events, retention
    from tasks_app.models import Attempt, Event, LogChunk, Run

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    call_command("seedruns", str(args.runs), "--tasks", "20", "--days", "3650", verbosity=0)
    chunk, attempt = batchsql.table(LogChunk), batchsql.table(Attempt)
    with transaction.atomic(), connection.cursor() as cursor:
        for seq in range(args.chunks):
            cursor.execute(
                f"INSERT INTO {chunk} (attempt_id, seq, stream, data) "
                f"SELECT id, %s, 'stdout', %s FROM {attempt}",
                [seq, "x" * 200 + "\n"],
            )
    rows = Run.objects.values_list("id", "task_id", "status", "finished_at").order_by("id")
    for start in range(0, args.runs, 10_000):
        with transaction.atomic():
            page = list(rows[start : start + 10_000])
            # Straight in (not events.record_many, which announces them to a
            # running server): one event per run, at its run's end.
            batchsql.insert_rows(
                Event,
                events.FIELDS,
                [
                    (events.RUN_FINISHED, run_id, None, task_id, None, {"status": status}, at)
                    for run_id, task_id, status, at in page
                ],
            )
    if connection.vendor == "postgresql":
        # What autovacuum does to a real database: the planner's statistics.
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    seeded = time.perf_counter() - started
    cutoff = retention.cutoff(timezone.now())
    old = Run.objects.filter(finished_at__lt=cutoff).count()
    counts_before = {
        "runs": Run.objects.count(),
        "attempts": Attempt.objects.count(),
        "log_chunks": LogChunk.objects.count(),
        "events": Event.objects.count(),
    }

    def timed(prune, batch: int) -> list[float]:
        times = []
        while True:
            t0 = time.perf_counter()
            gone = prune(cutoff, batch)
            if not gone:
                return sorted(times)
            times.append(time.perf_counter() - t0)

    def figures(times: list[float], rows: int) -> dict:
        return {
            "batches": len(times),
            "ms_per_batch": {
                "p50": round(statistics.median(times) * 1000, 1),
                "p95": round(times[max(int(len(times) * 0.95) - 1, 0)] * 1000, 1),
                "max": round(times[-1] * 1000, 1),
            },
            "total_s": round(sum(times), 2),
            "rows_per_s": round(rows / sum(times)),
        }

    # What one service tick does: a batch of runs (with attempts, chunks and
    # deliveries, one transaction), then a batch of events; timed apart.
    run_times = timed(retention._prune_runs, args.batch)
    event_times = timed(retention._prune_events, args.batch * retention.EVENTS_PER_BATCH)
    t0 = time.perf_counter()
    retention.prune()
    idle = time.perf_counter() - t0
    result = {
        "database": connection.vendor,
        "seeded": counts_before,
        "seed_s": round(seeded, 1),
        "old_runs": old,
        "runs_left": Run.objects.count(),
        "events_left": Event.objects.count(),
        "runs": {"batch": args.batch, **figures(run_times, old * (2 + args.chunks))},
        "events": {
            "batch": args.batch * retention.EVENTS_PER_BATCH,
            **figures(event_times, counts_before["events"] - Event.objects.count()),
        },
        "ms_idle_pass": round(idle * 1000, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
