"""The overview's server time at scale on PostgreSQL: `.venv/bin/python tests/bench_overview.py`.

It makes a scratch database (dropped after, unless --keep), migrates it,
inserts --runs runs with their attempts in two INSERT ... SELECT
generate_series statements (finished runs spread evenly over the past
--days days, 90% succeeded, 7% failed, 3% cancelled, over --tasks tasks and
--workers workers, plus some queued and running ones), ANALYZEs, then times
the overview page and each of its partials through Django's test client in
this process (middleware, queries, templates: the server's time, not the
network's) and prints one JSON object. Nothing is asserted: a figure to read.

    .venv/bin/python tests/bench_overview.py --runs 100000 --runs 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS_SQL = """
INSERT INTO tasks_app_run (task_id, task_name, definition, "trigger", status, created_at,
    started_at, finished_at, cancel_requested_by, reason, params)
SELECT t, 'bench-' || lpad(t::text, 3, '0'), '{}'::jsonb, 'schedule', s,
       f - interval '2 seconds' - d, f - d, f,
       '', CASE WHEN s = 'failed' THEN 'exit code 1' ELSE '' END, '{}'::jsonb
  FROM (SELECT i, 1 + (i::bigint * 7919) %% %(tasks)s AS t,
               CASE WHEN i %% 100 < 90 THEN 'succeeded'
                    WHEN i %% 100 < 97 THEN 'failed' ELSE 'cancelled' END AS s,
               now() - (%(runs)s - i) * (%(days)s * interval '1 day' / %(runs)s) AS f,
               (i %% 50) * interval '100 milliseconds' AS d
          FROM generate_series(1, %(runs)s) AS i) AS g
"""
ATTEMPTS_SQL = """
INSERT INTO tasks_app_attempt (run_id, shard_index, try_number, worker_id, worker_name, status,
    exit_code, reason, queued_at, labels_key, ready_at, queue_at, assigned_at, started_at,
    finished_at, closed_by_master, late_status, late_reason, output_bytes, stored_bytes,
    truncated)
SELECT r.id, 0, 1, w.id, w.name, r.status,
       CASE WHEN r.status = 'failed' THEN 1 WHEN r.status = 'succeeded' THEN 0 END,
       r.reason, r.created_at, '', r.created_at, r.created_at, r.started_at, r.started_at,
       r.finished_at, false, '', '', 0, 0, false
  FROM tasks_app_run r
  JOIN workers_app_worker w ON w.id = (SELECT min(id) FROM workers_app_worker)
                                      + r.id %% %(workers)s
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, action="append", help="runs (repeatable)")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=15, help="timed requests per URL")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    from tests import engines

    results = []
    for runs in args.runs or [100_000]:
        url = engines.with_database(engines.ADMIN_URL, f"bench_overview_{uuid.uuid4().hex[:8]}")
        _create(engines, url)
        try:
            results.append(_measure(url, runs, args))
        finally:
            if not args.keep:
                engines.drop_database(url)
    print(json.dumps({"overview": results}, indent=2))
    return 0


def _create(engines, url: str) -> None:
    import psycopg

    admin = engines.with_database(engines.ADMIN_URL, "postgres")
    with psycopg.connect(engines.libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')


def _measure(url: str, runs: int, args) -> dict:
    """In a child process: Django's settings are read once per process."""
    import subprocess

    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "scheduler_site.settings"}
    env.setdefault("SCHEDULER_DATA_DIR", f"/tmp/bench-overview-{os.getpid()}")
    code = (
        "import json, sys; from tests.bench_overview import child; "
        f"print(json.dumps(child({runs}, {args.tasks}, {args.workers}, {args.days}, "
        f"{args.repeat})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    sys.stderr.write(out.stderr)
    out.check_returncode()
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(runs: int, tasks: int, workers: int, days: float, repeat: int) -> dict:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from tasks_app import roles, tokens
    from tasks_app.models import Task
    from workers_app.models import Worker

    call_command("migrate", verbosity=0)
    for i in range(1, tasks + 1):
        Task.objects.create(id=i, name=f"bench-{i:03d}", command="true")
    for i in range(workers):
        Worker.objects.create(
            name=f"node-{i:02d}", capacity=8, state="online", credential_hash=tokens.digest(str(i))
        )
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        params = {"runs": runs, "tasks": tasks, "days": days, "workers": workers}
        cursor.execute(RUNS_SQL, params)
        # Work in flight: queued runs and running ones.
        cursor.execute(
            "UPDATE tasks_app_run SET status = 'queued', started_at = NULL, finished_at = NULL"
            " WHERE id > %s",
            [runs - 200],
        )
        cursor.execute(
            "UPDATE tasks_app_run SET status = 'running', finished_at = NULL"
            " WHERE id > %s AND id <= %s",
            [runs - 250, runs - 200],
        )
        cursor.execute(ATTEMPTS_SQL, params)
        cursor.execute("ANALYZE")
    seeded_s = time.perf_counter() - t0
    user = get_user_model().objects.create_user("bench")
    roles.set_role(user, roles.VIEWER)
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    figures = {"runs": runs, "tasks": tasks, "workers": workers, "days": days}
    figures["seed_s"] = round(seeded_s, 1)
    urls = {"page": ("/", {})}
    for part in ("now", "activity", "tasks", "workers", "failures"):
        urls[part] = (f"/?part={part}", {"HX-Request": "true"})
    for name, (path, headers) in urls.items():
        client.get(path, headers=headers)  # warm: caches, prepared plans
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            response = client.get(path, headers=headers)
            times.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200, response.status_code
        figures[f"{name}_ms"] = {
            "median": round(statistics.median(times), 1),
            "min": round(min(times), 1),
        }
    print(f"{runs} runs: {figures}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    sys.exit(main())
