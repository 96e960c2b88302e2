"""The runs list's search at scale: `.venv/bin/python tests/runs_search_bench.py`.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/runs_bench \\
        .venv/bin/python tests/runs_search_bench.py [--runs 1000000] [--requests 20]

Fills the PostgreSQL database of DATABASE_URL (created if missing, migrated)
with --runs runs and their attempts in a few INSERT ... SELECT generate_series
statements (a million in about a minute), a realistic mix: 50 tasks of very
unequal sizes (a few run every minute, some a few times a day, one was
deleted), statuses mostly succeeded with failures, cancels and skips and the
newest few queued or running, triggers mostly schedule, then api, manual and
retry, 40 workers (one rare), 8% of runs with a second try on another worker,
spread over 30 days, every three runs created in the same instant (a bulk
trigger). A database that already holds that many runs is reused (--refill
starts again).

Then it times the runs list page (GET /runs/) and the API (GET /api/runs)
for each filter combination: the first page, and a deep page (its cursor a
run 25 days old that matches the filters). Each is requested --requests
times in this process through Django's test Client (middleware, view,
queries and template: the server's time, no network), after two warm-ups.
It prints a table of p50 and max in ms, then each case's main query and the
plan PostgreSQL chose for it (EXPLAIN ANALYZE), so an index that is not used
shows. Nothing is asserted: the target (50 ms) is read off the table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
os.environ.setdefault("SCHEDULER_DATA_DIR", "/tmp/runs-search-bench")

WORKERS = 40
TASKS = 50
DAYS = 30


def ensure_database(url: str) -> None:
    """Create the database of `url` when it does not exist yet."""
    from urllib.parse import urlsplit

    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def fill(count: int) -> float:
    """Replace every run and attempt with `count` generated ones; seconds taken."""
    from django.db import connection, transaction

    from tasks_app.models import Attempt, DeletedTask, Run, Task

    started = time.perf_counter()
    run_t, attempt_t = Run._meta.db_table, Attempt._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {attempt_t}, {run_t} RESTART IDENTITY CASCADE")
    Task.objects.all().delete()
    DeletedTask.objects.all().delete()
    # Task i's share of runs falls with i: etl-00 is the busiest.
    names = [
        f"{('etl', 'report', 'backup', 'sync', 'cleanup')[i % 5]}-{i:02d}" for i in range(TASKS)
    ]
    tasks = Task.objects.bulk_create(Task(name=n, command="true") for n in names)
    ids = [t.pk for t in tasks]
    # The last task was deleted (DeletedTask remembers it): its runs stay,
    # findable by its id.
    tasks[-1].delete()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT setseed(0.42)")
        # g: the run's id; r1..r3: its dice; the busiest tasks first (a
        # squared die), created evenly over DAYS in id order, three by three.
        cursor.execute(
            f"""
            INSERT INTO {run_t} (id, task_id, task_name, definition, trigger, status,
                created_at, started_at, finished_at, cancel_requested_at,
                cancel_requested_by, reason, params)
            SELECT g, ids[t + 1], names[t + 1], '{{}}'::jsonb,
                CASE WHEN r2 < 0.55 THEN 'schedule' WHEN r2 < 0.80 THEN 'api'
                     WHEN r2 < 0.92 THEN 'manual' ELSE 'retry' END,
                CASE WHEN g > %(n)s - 40 THEN 'queued' WHEN g > %(n)s - 120 THEN 'running'
                     WHEN r3 < 0.88 THEN 'succeeded' WHEN r3 < 0.95 THEN 'failed'
                     WHEN r3 < 0.98 THEN 'cancelled' ELSE 'skipped' END,
                created, created + interval '1 second', created + interval '3 seconds',
                NULL, '', '', '{{}}'::jsonb
            FROM (
                SELECT g, floor(power(random(), 2.5) * {TASKS})::int AS t,
                       random() AS r2, random() AS r3,
                       now() - interval '{DAYS} days'
                           + ((g - 1) / 3 * 3) * (interval '{DAYS} days' / %(n)s) AS created
                FROM generate_series(1, %(n)s) AS g
            ) AS dice, (SELECT %(names)s::text[] AS names, %(ids)s::bigint[] AS ids) AS n
            """,
            {"n": count, "names": names, "ids": ids},
        )
        # One attempt per run on one of 40 workers in turn (gpu-01: one run in 5,000),
        # and a second try on the next worker for 8% of them.
        cursor.execute(
            f"""
            INSERT INTO {attempt_t} (run_id, shard_index, try_number, worker_name, status,
                exit_code, reason, queued_at, labels_key, ready_at, queue_at, priority,
                assigned_at, started_at, finished_at, closed_by_master, late_status,
                late_reason, output_bytes, stored_bytes, truncated)
            SELECT r.id, 0, k, w, CASE WHEN r.status IN ('queued', 'running') THEN r.status
                                       WHEN r.status = 'skipped' THEN 'cancelled'
                                       ELSE r.status END,
                CASE WHEN r.status = 'failed' THEN 1 ELSE 0 END, '', r.created_at, '',
                r.created_at, r.created_at, 0, r.created_at, r.started_at, r.finished_at,
                false, '', '', 12, 12, false
            FROM {run_t} r,
                LATERAL (
                    SELECT 1 AS k, CASE WHEN mod(r.id, 5000) = 0 THEN 'gpu-01'
                        ELSE 'node-' || lpad((1 + mod(r.id * 7919, {WORKERS}))::text,
                                             2, '0') END AS w
                    UNION ALL
                    SELECT 2, 'node-' || lpad((1 + mod(r.id * 7919 + 1, {WORKERS}))::text, 2, '0')
                    WHERE mod(r.id, 100) < 8
                ) AS tries
            """
        )
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('{run_t}', 'id'), (SELECT max(id) FROM {run_t}))"
        )
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {run_t}")
        cursor.execute(f"VACUUM ANALYZE {attempt_t}")
    return time.perf_counter() - started


def cases() -> list[tuple[str, str]]:
    """(label, query string) per filter combination."""
    from tasks_app.models import DeletedTask, Run, Task

    busy = Task.objects.get(name="etl-00").pk
    small = Task.objects.get(name="sync-43").pk
    deleted = DeletedTask.objects.get().pk
    newest = Run.objects.order_by("-created_at").values_list("created_at", flat=True)[0]
    day = (newest - __import__("datetime").timedelta(days=1)).date().isoformat()
    old = (newest - __import__("datetime").timedelta(days=20)).date().isoformat()
    old_end = (newest - __import__("datetime").timedelta(days=19)).date().isoformat()
    return [
        ("no filter", ""),
        ("status=failed", "status=failed"),
        ("status=queued,running (rare)", "status=queued&status=running"),
        ("status=failed,cancelled", "status=failed&status=cancelled"),
        ("task (busiest)", f"task={busy}"),
        ("task (small)", f"task={small}"),
        ("task (deleted)", f"task={deleted}"),
        ("name=etl (prefix, common)", "name=etl"),
        ("name=sync-43 (one small task)", "name=sync-43"),
        ("name=zzz (nothing)", "name=zzz"),
        ("worker=node-07", "worker=node-07"),
        ("worker=gpu-01 (rare)", "worker=gpu-01"),
        ("worker=nobody (nothing)", "worker=nobody"),
        ("trigger=manual", "trigger=manual"),
        ("trigger=retry,api", "trigger=retry&trigger=api"),
        ("since=last day", f"since={day}"),
        ("since..until one day 20 d ago", f"since={old}&until={old}"),
        ("until 20 d ago", f"until={old_end}"),
        ("status=failed + worker", "status=failed&worker=node-03"),
        ("name + trigger + status", "name=report&trigger=schedule&status=succeeded"),
        ("small task + failed + range", f"task={small}&status=failed&since={old}"),
        ("rare worker + failed", "worker=gpu-01&status=failed"),
        (
            "all five",
            f"name=etl&status=succeeded&status=failed&worker=node-11&trigger=schedule&since={old}",
        ),
        ("failed + nothing-name", "status=failed&name=zzz"),
    ]


def deep_cursor(query: str) -> int | None:
    """A run 25 days old that matches the query: the cursor of a deep page."""
    import datetime as dt

    from django.http import QueryDict

    from tasks_app import history

    filters = history.parse_filters(QueryDict(query))
    runs = history.filtered_runs(**filters)
    newest = runs.order_by("-created_at").values_list("created_at", flat=True).first()
    if newest is None:
        return None
    limit = newest - dt.timedelta(days=25)
    row = (
        runs.filter(created_at__lte=limit).order_by("-created_at", "-id").values_list("pk").first()
    )
    if row is None:  # a range shorter than 25 days: its middle
        count = min(runs.count(), 20_000)
        row = runs.order_by("-created_at", "-id").values_list("pk")[count // 2 : count // 2 + 1]
        row = row[0] if row else None
    return row[0] if row else None


def timed(client, url: str, requests: int) -> tuple[float, float, float, int]:
    """p50 and max wall ms of `requests` GETs (after two warm-ups), the p50 of
    this process's CPU ms (Python's share: the rest is PostgreSQL's, or waiting
    for a core on a busy machine), and the status."""
    for _ in range(2):
        response = client.get(url)
    times, cpu = [], []
    for _ in range(requests):
        start, start_cpu = time.perf_counter(), time.thread_time()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - start_cpu) * 1000)
    return statistics.median(times), max(times), statistics.median(cpu), response.status_code


def main_query(client, url: str) -> str:
    """The SQL of the runs query a request ran (the one ordered by created_at)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    for query in queries.captured_queries:
        if "ORDER BY" in query["sql"] and '"created_at" DESC' in query["sql"]:
            return query["sql"]
    return ""


def explain(sql: str) -> str:
    """The plan, as history.runs_page runs the query (its SET LOCALs)."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SET LOCAL max_parallel_workers_per_gather = 0; SET LOCAL random_page_cost = 1.1"
        )
        cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}")
        return "\n".join(row[0] for row in cursor.fetchall())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per cell")
    parser.add_argument("--refill", action="store_true", help="fill even if runs are there")
    parser.add_argument("--no-plans", action="store_true", help="the table without the plans")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        parser.error("set DATABASE_URL to a PostgreSQL database (it is created if missing)")
    ensure_database(url)

    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    from tasks_app import roles
    from tasks_app.models import ApiToken, Attempt, Run

    # Not setup_test_environment(): its instrumented template rendering copies
    # every context for the test client, a cost no real request pays.
    settings.ALLOWED_HOSTS = ["testserver"]
    call_command("migrate", verbosity=0)
    have = Run.objects.count()
    if args.refill or have != args.runs:
        print(f"filling {args.runs:,} runs ...", file=sys.stderr, flush=True)
        seconds = fill(args.runs)
        print(f"filled in {seconds:.1f} s", file=sys.stderr, flush=True)
    runs, attempts = Run.objects.count(), Attempt.objects.count()
    user, _ = User.objects.get_or_create(username="bench")
    roles.set_role(user, roles.OPERATOR)
    page = Client()
    page.force_login(user)
    raw, _ = ApiToken.mint(user, name="bench")
    api = Client(headers={"Authorization": f"Bearer {raw}"})

    print(
        f"{runs:,} runs, {attempts:,} attempts; page size {settings.SCHEDULER_PAGE_SIZE} "
        f"(view) and 50 (API); {args.requests} requests per cell, ms of server time"
    )
    print("each cell: p50/max wall ms, then p50 CPU ms of this process")
    print("db: the runs query's own time in PostgreSQL (EXPLAIN ANALYZE), first / deep page")
    head = f"{'filters':34} {'rows':>5} | {'view 1st':>16} | {'view deep':>16} | "
    head += f"{'API 1st':>16} | {'API deep':>16} | {'db 1st/deep':>11}"
    print(head)
    print("-" * len(head))
    plans = []
    worst = 0.0
    for label, query in cases():
        before = deep_cursor(query)
        deep = f"{query}&before={before}" if before else None
        cells, rows = [], "?"
        for base in ("/runs/", "/api/runs"):
            client = page if base == "/runs/" else api
            for q in (query, deep):
                if q is None:
                    cells.append(f"{'-':>16}")
                    continue
                p50, top, cpu, status = timed(client, f"{base}?{q}", args.requests)
                worst = max(worst, p50)
                mark = "" if status == 200 else f" ({status})"
                cells.append(f"{p50:5.1f}/{top:5.1f} {cpu:4.1f}{mark}")
        response = api.get(f"/api/runs?{query}")
        rows = len(response.json()["results"])
        db = []
        for q in (query, deep):
            sql = main_query(api, f"/api/runs?{q}") if q else ""
            plan = explain(sql) if sql else ""
            found = re.search(r"Execution Time: ([\d.]+) ms", plan)
            db.append(f"{float(found.group(1)):.1f}" if found else "-")
            if q and (q == deep or not deep):
                plans.append((label, sql, plan))
        print(
            f"{label:34} {rows:>5} | {cells[0]:>16} | {cells[1]:>16} | {cells[2]:>16} | "
            f"{cells[3]:>16} | {'/'.join(db):>11}",
            flush=True,
        )
    print(f"\nworst p50: {worst:.1f} ms")
    if not args.no_plans:
        for label, sql, plan in plans:
            print(f"\n== {label} (the deep page)\n{sql}\n{plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
