"""`manage.py seedruns N [--tasks K] [--days D]`: N finished runs, to try history at scale.

Each run gets its one attempt, shaped like what the lifecycle writes for a
real run (snapshot of its task, queue columns, timestamps in order, reason
texts as the agent and refresh_runs word them): mostly succeeded, some
failed, a few cancelled before they started, spread evenly over the past D
days in id order (as real runs are), over K tasks named seed-01.. that are
created or reused.

Rows go in with raw executemany, CHUNK runs per transaction: building two
million ORM instances for a million runs would take minutes. Each chunk
takes its ids itself (max id + 1) while holding the write lock, so a server
that keeps running beside it never sees a collision.
"""

from __future__ import annotations

import datetime as dt
import random
import time

from django.core.management.base import BaseCommand, CommandError
from django.core.management.color import no_style
from django.db import connection, transaction
from django.utils import timezone

from tasks_app.models import Attempt, Run, Task, labels_key

MAX_RUNS = 50_000_000
MAX_TASKS = 1000
CHUNK = 20_000
# Commands the seeded tasks show; what they ran does not matter here.
COMMANDS = (
    "true",
    "echo hello",
    "python3 -c 'print(6*7)'",
    "sleep 1",
    "sh -c 'date; uptime'",
)
WORKERS = tuple(f"node-{i}" for i in range(1, 9))
EXIT_CODES = (1, 1, 1, 2, 3, 127)
FAILED_SHARE, CANCELLED_SHARE = 0.07, 0.03

RUN_COLUMNS = (
    "id",
    "task_id",
    "task_name",
    "definition",
    "trigger",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "reason",
    "created_by_id",
    "retry_of_id",
    "params",
)
ATTEMPT_COLUMNS = (
    "id",
    "run_id",
    "shard_index",
    "try_number",
    "worker_id",
    "worker_name",
    "status",
    "exit_code",
    "reason",
    "pid",
    "queued_at",
    "labels_key",
    "ready_at",
    "queue_at",
    "timeout_s",
    "assigned_at",
    "accepted_at",
    "started_at",
    "finished_at",
    "closed_by_master",
    "late_status",
    "late_exit_code",
    "late_reason",
    "late_reported_at",
    "output_bytes",
    "stored_bytes",
    "truncated",
)


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    marks = ", ".join(["%s"] * len(columns))
    return f"INSERT INTO {connection.ops.quote_name(table)} ({names}) VALUES ({marks})"


class TaskShape:
    """What every run of one task repeats, adapted for the database once."""

    def __init__(self, task: Task) -> None:
        self.id = task.pk
        self.name = task.name
        definition_field = Run._meta.get_field("definition")
        self.definition = definition_field.get_db_prep_save(task.definition(), connection)
        self.params = Run._meta.get_field("params").get_db_prep_save({}, connection)
        self.labels_key = labels_key(task.labels)
        self.timeout = task.timeout


class Seeder:
    """Builds the rows of the runs to seed and inserts them, a chunk at a time."""

    def __init__(self, tasks: list[TaskShape], total: int, days: float) -> None:
        self.tasks = tasks
        # Naive UTC throughout: the adapter below turns them into what the database keeps.
        now = timezone.now().replace(tzinfo=None)
        self.step = dt.timedelta(days=days) / total
        self.oldest = now - self.step * total
        self.rng = random.Random(6)
        self.adapt = _datetime_adapter()
        self.run_sql = _insert_sql(Run._meta.db_table, RUN_COLUMNS)
        self.attempt_sql = _insert_sql(Attempt._meta.db_table, ATTEMPT_COLUMNS)

    def insert_chunk(self, done: int, count: int) -> None:
        """Runs number done .. done + count - 1 of the whole seeding, in one transaction."""
        with transaction.atomic(), connection.cursor() as cursor:
            run_id, attempt_id = _next_ids(cursor)
            runs, attempts = [], []
            for i in range(count):
                run, attempt = self._rows(done + i, run_id + i, attempt_id + i)
                runs.append(run)
                attempts.append(attempt)
            cursor.executemany(self.run_sql, runs)
            cursor.executemany(self.attempt_sql, attempts)
            for sql in connection.ops.sequence_reset_sql(no_style(), [Run, Attempt]):
                cursor.execute(sql)

    def _rows(self, index: int, run_id: int, attempt_id: int) -> tuple[tuple, tuple]:
        rng, adapt, ms = self.rng.random, self.adapt, dt.timedelta(milliseconds=1)
        task = self.tasks[index % len(self.tasks)]
        created = self.oldest + self.step * index
        queued = created + ms * (0.2 + 2 * rng())
        roll = rng()
        worker = WORKERS[int(rng() * len(WORKERS))]
        assigned = accepted = started = pid = exit_code = None
        if roll < CANCELLED_SHARE:
            # Cancelled while queued: no worker ever had it (lifecycle.cancel_run).
            status, reason, run_reason, worker = "cancelled", "cancelled", "", ""
            finished = queued + ms * 1000 * (1 + 120 * rng())
        else:
            assigned = adapt(queued + ms * (0.3 + 5 * rng()))
            accepted = adapt(queued + ms * (6 + 2 * rng()))
            start = queued + ms * (8 + 2 * rng())
            started = adapt(start)
            # Durations: mostly short, a long tail (exponential, mean 2 s).
            finished = start + ms * 1000 * self.rng.expovariate(0.5)
            pid = 1000 + int(rng() * 4_000_000)
            if roll < CANCELLED_SHARE + FAILED_SHARE:
                exit_code = EXIT_CODES[int(rng() * len(EXIT_CODES))]
                status, reason = "failed", f"exit code {exit_code}"
                run_reason = f"{reason} (after 1 attempt)"  # as refresh_runs words it
            else:
                status, reason, run_reason, exit_code = "succeeded", "", "", 0
        queued, finished = adapt(queued), adapt(finished)
        cancel_requested = finished if status == "cancelled" else None
        trigger = "api" if rng() < 0.6 else "manual"
        run = (
            run_id,
            task.id,
            task.name,
            task.definition,
            trigger,
            status,
            adapt(created),
            started,
            finished,
            cancel_requested,
            run_reason,
            None,  # created_by
            None,  # retry_of
            task.params,
        )
        attempt = (
            attempt_id,
            run_id,
            0,  # shard_index
            1,  # try_number
            None,  # a worker that no longer exists: history keeps its name
            worker,
            status,
            exit_code,
            reason,
            pid,
            queued,
            task.labels_key,
            queued,  # ready_at: a first try is ready when it is queued
            queued,  # queue_at: priority 0
            task.timeout,
            assigned,
            accepted,
            started,
            finished,
            False,  # closed_by_master and the late_* fields: no late report
            "",
            None,
            "",
            None,
            0,  # output_bytes, stored_bytes: no log chunks are seeded
            0,
            False,
        )
        return run, attempt


def _datetime_adapter():
    """Naive UTC datetime -> what the database driver takes for a DateTimeField.

    Django's adapt_datetimefield_value spends 4 us a call on time zone checks,
    half of all the seeding time; on SQLite it comes down to str() of the
    naive UTC time, so where it does (checked, not assumed) use str directly.
    """
    adapt = connection.ops.adapt_datetimefield_value
    probe = dt.datetime(2000, 1, 2, 3, 4, 5, 6789)
    if adapt(probe.replace(tzinfo=dt.UTC)) == str(probe):
        return str
    return lambda value: adapt(value.replace(tzinfo=dt.UTC))


def _next_ids(cursor) -> tuple[int, int]:
    """The next free run and attempt ids; call inside the chunk's transaction."""
    tables = (Run._meta.db_table, Attempt._meta.db_table)
    if connection.vendor == "postgresql":
        # Nobody else inserts until we commit (and reset the sequences past our ids).
        cursor.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
    ids = []
    for table in tables:
        cursor.execute(f"SELECT MAX(id) FROM {connection.ops.quote_name(table)}")
        highest = cursor.fetchone()[0] or 0
        if connection.vendor == "sqlite":
            # AUTOINCREMENT never reuses the id of a deleted row; neither do we.
            cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = %s", [table])
            row = cursor.fetchone()
            highest = max(highest, row[0] if row else 0)
        ids.append(highest + 1)
    return ids[0], ids[1]


def _seed_tasks(count: int) -> list[Task]:
    """seed-01 .. seed-K, created when missing, reused (as they are) when present."""
    tasks = []
    for i in range(1, count + 1):
        task, _ = Task.objects.get_or_create(
            name=f"seed-{i:02d}", defaults={"command": COMMANDS[(i - 1) % len(COMMANDS)]}
        )
        tasks.append(task)
    return tasks


class Command(BaseCommand):
    help = (
        "Insert N finished runs (each with its attempt) over K seed tasks, to try the "
        "dashboard and the API with a large history."
    )

    def add_arguments(self, parser):
        parser.add_argument("count", type=int, help=f"how many runs (1 to {MAX_RUNS:,})")
        parser.add_argument(
            "--tasks", type=int, default=10, help="over how many tasks, seed-01.. (default 10)"
        )
        parser.add_argument(
            "--days", type=float, default=30, help="spread over the past DAYS days (default 30)"
        )

    def handle(self, *args, count: int, tasks: int, days: float, **options):
        if not 1 <= count <= MAX_RUNS:
            raise CommandError(f"N must be between 1 and {MAX_RUNS:,}, not {count:,}")
        if not 1 <= tasks <= MAX_TASKS:
            raise CommandError(f"--tasks must be between 1 and {MAX_TASKS}, not {tasks}")
        if not 0 < days <= 36500:
            raise CommandError(f"--days must be more than 0 and at most 36500, not {days}")
        began = time.monotonic()
        shapes = [TaskShape(task) for task in _seed_tasks(tasks)]
        seeder = Seeder(shapes, count, days)
        for done in range(0, count, CHUNK):
            seeder.insert_chunk(done, min(CHUNK, count - done))
            if options["verbosity"] >= 2:
                self.stderr.write(f"{done + min(CHUNK, count - done):,} of {count:,} runs")
        elapsed = time.monotonic() - began
        self.stdout.write(
            f"seeded {count:,} finished runs over {tasks} tasks in {elapsed:.1f}s "
            f"({count / elapsed:,.0f} runs/s)"
        )
