"""Retention: runs, their output and events older than SCHEDULER_RETENTION_DAYS
are deleted in small batches, and nothing else."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse
from django.utils import timezone

from scheduler_site.envconfig import env_number
from tasks_app import events, retention
from tasks_app.models import Attempt, AuditEntry, Delivery, Event, LogChunk, Run, Task
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db

NOW = timezone.now()
OLD = NOW - dt.timedelta(days=31)
RECENT = NOW - dt.timedelta(days=29)


def make_run(task: Task, status: str, finished_at, *, created_at=None, retry_of=None) -> Run:
    """A run with two attempts, each with output, a delivery and events."""
    created_at = created_at or (finished_at or NOW) - dt.timedelta(minutes=1)
    run = Run.objects.create(
        task=task,
        task_name=task.name,
        definition={},
        status=status,
        created_at=created_at,
        finished_at=finished_at,
        retry_of=retry_of,
    )
    for try_number in (1, 2):
        attempt = Attempt.objects.create(run=run, try_number=try_number, status="failed")
        LogChunk.objects.bulk_create(
            [
                LogChunk(attempt=attempt, seq=n, stream="stdout", data=f"line {n}\n")
                for n in range(3)
            ]
        )
    Delivery.objects.create(
        event_id=run.pk,
        run_id=run.pk,
        task_id=task.pk,
        kind="failure",
        channel="email",
        target="a@b.c",
    )
    return run


@pytest.fixture
def tasks():
    return Task.objects.create(name="mine", command="true"), Task.objects.create(
        name="other", command="true"
    )


def test_it_deletes_what_is_old_and_nothing_else(settings, tasks):
    settings.SCHEDULER_RETENTION_DAYS = 30
    mine, other = tasks
    old = [make_run(mine, s, OLD) for s in ("succeeded", "failed", "cancelled", "skipped")]
    recent = make_run(mine, "failed", RECENT)
    # Old but not over: never touched, whatever their age.
    queued = make_run(mine, "queued", None, created_at=OLD - dt.timedelta(days=10))
    running = make_run(mine, "running", None, created_at=OLD - dt.timedelta(days=10))
    # Created long ago, ended recently: kept (it is the end that counts).
    long_one = make_run(other, "succeeded", RECENT, created_at=OLD - dt.timedelta(days=5))
    others_newer = make_run(other, "failed", NOW)
    # A newer retry of an old run lives on, its link cleared.
    retry = make_run(mine, "succeeded", NOW, retry_of=old[1])
    kept = [recent, queued, running, long_one, others_newer, retry]
    with_events(old, at=OLD)
    with_events(kept, at=RECENT)
    # The early events of runs that are kept stay with them (no holes in a
    # timeline); an old event of no run (a worker's) goes by its age.
    with_events([queued, running, long_one], at=OLD)
    events.record_many([(events.WORKER_ONLINE, None, None, None, 7, {})], at=OLD)
    AuditEntry.objects.create(actor="system", action="task.create", at=OLD - dt.timedelta(days=400))

    while retention.prune(NOW):
        pass

    assert set(Run.objects.values_list("id", flat=True)) == {run.pk for run in kept}
    assert set(Attempt.objects.values_list("run_id", flat=True)) == {run.pk for run in kept}
    assert LogChunk.objects.count() == len(kept) * 2 * 3
    assert set(Delivery.objects.values_list("run_id", flat=True)) == {run.pk for run in kept}
    run_events = Event.objects.filter(run_id__isnull=False)
    assert set(run_events.values_list("run_id", flat=True)) == {run.pk for run in kept}
    early = run_events.filter(at=OLD).values_list("run_id", flat=True)
    assert sorted(early) == sorted([queued.pk, running.pk, long_one.pk])
    assert not Event.objects.filter(kind=events.WORKER_ONLINE).exists()
    # The tasks' own events (created just now) are recent: kept.
    assert Event.objects.filter(kind=events.TASK_CREATED).count() == 2
    retry.refresh_from_db()
    assert retry.retry_of_id is None
    # The audit log is kept whatever its age (README, Audit).
    assert AuditEntry.objects.count() == 1


def with_events(runs, at):
    events.record_many(
        [
            (events.RUN_FINISHED, run.pk, None, run.task_id, None, {"status": run.status})
            for run in runs
        ],
        at=at,
    )


def test_it_goes_a_batch_at_a_time(settings, tasks):
    settings.SCHEDULER_RETENTION_DAYS = 30
    mine, _ = tasks
    for _ in range(5):
        make_run(mine, "succeeded", OLD)
    newer = make_run(mine, "succeeded", RECENT)

    left = []
    passes = 0
    while retention.prune(NOW, batch=2):
        passes += 1
        left.append(Run.objects.count())
    assert passes == 3
    assert left == [4, 2, 1]
    assert list(Run.objects.values_list("id", flat=True)) == [newer.pk]


@pytest.mark.django_db(transaction=True)
def test_the_service_deletes_a_batch_a_tick_then_rests(settings):
    settings.SCHEDULER_RETENTION_DAYS = 30
    settings.SCHEDULER_RETENTION_BATCH = 2
    mine = Task.objects.create(name="mine", command="true")
    for _ in range(3):
        make_run(mine, "failed", OLD)
    service = SchedulerService()

    def tick() -> int:
        service.prune_history()
        # PostgreSQL: the batch runs on the pruner's thread.
        service.pruner.wait()
        return Run.objects.count()

    assert [tick() for _ in range(5)] == [1, 0, 0, 0, 0]
    # Caught up: it looks again only after a while.
    make_run(mine, "failed", OLD)
    assert tick() == 1


def test_zero_keeps_everything(settings, tasks):
    settings.SCHEDULER_RETENTION_DAYS = 0
    mine, _ = tasks
    make_run(mine, "failed", NOW - dt.timedelta(days=3650))
    with_events(list(Run.objects.all()), at=NOW - dt.timedelta(days=3650))

    assert retention.prune(NOW) == 0
    old_events = Event.objects.filter(at__lt=NOW - dt.timedelta(days=3000))
    assert (Run.objects.count(), old_events.count(), LogChunk.objects.count()) == (1, 1, 6)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("-1", "SCHEDULER_RETENTION_DAYS must be at least 0, not '-1'"),
        ("30d", "SCHEDULER_RETENTION_DAYS must be a whole number, not '30d'"),
        ("7.5", "SCHEDULER_RETENTION_DAYS must be a whole number, not '7.5'"),
    ],
)
def test_a_bad_retention_setting_stops_the_server(monkeypatch, raw, message):
    # The reader settings.py uses for it, with the same arguments.
    monkeypatch.setenv("SCHEDULER_RETENTION_DAYS", raw)
    with pytest.raises(ImproperlyConfigured) as refused:
        env_number("SCHEDULER_RETENTION_DAYS", 30, minimum=0, integer=True)
    assert str(refused.value) == message


def test_kept_says_what_is_kept_and_the_runs_page_shows_it(settings, tasks, bob_client):
    settings.SCHEDULER_RETENTION_DAYS = 30
    mine, _ = tasks
    first = make_run(mine, "failed", RECENT, created_at=dt.datetime(2026, 11, 1, 8, tzinfo=dt.UTC))
    make_run(mine, "failed", NOW)

    assert retention.kept() == {"days": 30, "oldest_run_at": first.created_at}
    # The runs list and the overview say it, the oldest run's time in the viewer's zone.
    for url in (reverse("tasks:runs"), reverse("home")):
        page = bob_client.get(url).content.decode()
        assert "Keeping 30 days of runs, output and events; oldest run" in page
        assert '<time datetime="2026-11-01T08:00:00.000Z"' in page

    settings.SCHEDULER_RETENTION_DAYS = 0
    page = bob_client.get(reverse("tasks:runs")).content.decode()
    assert "Keeping all runs, output and events (retention off)" in page
