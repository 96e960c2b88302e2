"""What a scrape of /metrics costs with a long queue:
`.venv/bin/python tests/bench_metrics.py [--queued N] [--engine sqlite|postgres]`.

Seeds N queued attempts (their runs queued, over a few label sets, a tenth of
them delayed into the future) and a few hundred workers in a database of its
own (a temporary SQLite data dir, or a PostgreSQL database made and dropped
like the scale-out tests'), then times, in this process, the database-wide
collectors and the whole /metrics view through Django's test client. Prints
one JSON object; nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABEL_SETS = ("", "linux", "gpu,linux", "arm64", "@7")
CHUNK = 10_000


def timed(call, samples: int) -> dict[str, float]:
    call()  # warm: the first connection, Python's imports
    spent = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        spent.append((time.perf_counter() - start) * 1000)
    spent.sort()
    return {
        "p50_ms": round(statistics.median(spent), 2),
        "max_ms": round(spent[-1], 2),
        "min_ms": round(spent[0], 2),
    }


def seed(queued: int) -> None:
    from django.db import transaction
    from django.utils import timezone

    from tasks_app import tokens
    from tasks_app.models import Attempt, Run, Task
    from workers_app.models import Worker

    task = Task.objects.create(name="seeded", command="true")
    definition = task.definition()
    now = timezone.now()
    Worker.objects.bulk_create(
        Worker(
            name=f"node-{i}",
            capacity=4,
            state=("online", "offline", "draining")[i % 3],
            credential_hash=tokens.digest(f"wkr_{i}"),
        )
        for i in range(300)
    )
    for start in range(0, queued, CHUNK):
        size = min(CHUNK, queued - start)
        with transaction.atomic():
            runs = Run.objects.bulk_create(
                Run(task=task, task_name=task.name, definition=definition, created_at=now)
                for _ in range(size)
            )
            attempts = []
            for n, run in enumerate(runs, start):
                # Oldest first; every tenth delayed an hour into the future.
                ready = now - dt.timedelta(seconds=queued - n)
                if n % 10 == 0:
                    ready = now + dt.timedelta(hours=1)
                attempts.append(
                    Attempt(
                        run=run,
                        labels_key=LABEL_SETS[n % len(LABEL_SETS)],
                        queued_at=ready,
                        ready_at=ready,
                        queue_at=ready,
                    )
                )
            Attempt.objects.bulk_create(attempts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-metrics-")
    os.environ["SCHEDULER_DATA_DIR"] = work
    os.environ.pop("REDIS_URL", None)
    database_url = ""
    if args.engine == "postgres":
        from tests import engines

        database_url = engines.create_database()
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "scheduler_site.settings"
    try:
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client

        from tasks_app.metrics import queue_figures
        from tests.engines import query_plan
        from workers_app.metrics import fleet_figures

        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        seed(args.queued)
        seeded_s = time.perf_counter() - started
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE tasks_app_attempt")
        else:
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        client = Client(HTTP_HOST="localhost", REMOTE_ADDR="127.0.0.1")

        def scrape() -> None:
            response = client.get("/metrics")
            assert response.status_code == 200, response.content[:200]

        depth, age = queue_figures()
        with connection.cursor() as cursor:
            plan = query_plan(
                cursor, "SELECT COUNT(*) FROM tasks_app_attempt WHERE status = 'queued'"
            )
        report = {
            "engine": connection.vendor,
            "queued": args.queued,
            "seed_s": round(seeded_s, 1),
            "queue_depth": depth,
            "oldest_age_s": round(age),
            "queue_figures": timed(queue_figures, args.samples),
            "fleet_figures": timed(fleet_figures, args.samples),
            "scrape": timed(scrape, args.samples),
            "scrape_bytes": len(client.get("/metrics").content),
            "depth_plan": plan,
        }
        print(json.dumps(report, indent=1))
    finally:
        from django.db import connections

        connections.close_all()
        if database_url:
            engines.drop_database(database_url)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
