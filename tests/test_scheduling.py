"""Cron firing: runs made by the schedule at the right times, once each,
after downtime per the misfire policy. The clock is moved, never slept on."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import IntegrityError, connection, transaction

from tasks_app import clock, lifecycle, scheduling
from tasks_app.models import Run, SchedulerState, Task
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db

UTC = dt.UTC


def utc(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)


def scheduled(task: Task) -> list[dt.datetime]:
    return sorted(
        Run.objects.filter(task=task, trigger=Run.Trigger.SCHEDULE).values_list(
            "scheduled_for", flat=True
        )
    )


def make(name="tick", *, at: dt.datetime, **fields) -> Task:
    with clock.frozen(at):
        return Task.objects.create(name=name, command="true", **fields)


def fire_every_minute(start: dt.datetime, end: dt.datetime) -> None:
    """A scheduler that never misses a beat: one pass a minute, 20 s late."""
    now = start
    while now <= end:
        scheduling.fire_due(now + dt.timedelta(seconds=20))
        now += dt.timedelta(minutes=1)


def test_it_fires_berlins_spring_night_at_the_known_times():
    task = make(schedule="30 2 * * *", timezone="Europe/Berlin", at=utc(2026, 3, 28, 12))
    hourly = make("hourly", schedule="0 * * * *", timezone="Europe/Berlin", at=utc(2026, 3, 28, 22))

    fire_every_minute(utc(2026, 3, 28, 22), utc(2026, 3, 30, 1))

    # 02:30 does not exist on the 29th: it fires at 03:00 CEST (01:00Z), once.
    assert scheduled(task) == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]
    # Hourly follows real time: every UTC hour, none twice, none missing.
    assert scheduled(hourly) == [utc(2026, 3, 28, 23) + dt.timedelta(hours=h) for h in range(27)]


def test_it_fires_berlins_autumn_repeat_once():
    task = make(schedule="30 2 * * *", timezone="Europe/Berlin", at=utc(2026, 10, 24, 12))
    fire_every_minute(utc(2026, 10, 24, 22), utc(2026, 10, 26, 2))
    # The first 02:30 (CEST, 00:30Z) only, then 02:30 CET (01:30Z) the next day.
    assert scheduled(task) == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_it_fires_new_york_across_both_changes():
    task = make(schedule="0 9 * * *", timezone="America/New_York", at=utc(2026, 3, 7, 0))
    fire_every_minute(utc(2026, 3, 7, 13), utc(2026, 3, 8, 14))
    assert scheduled(task) == [utc(2026, 3, 7, 14), utc(2026, 3, 8, 13)]

    autumn = make(
        "autumn", schedule="30 1 * * *", timezone="America/New_York", at=utc(2026, 10, 31)
    )
    fire_every_minute(utc(2026, 11, 1, 4), utc(2026, 11, 2, 7))
    # 01:30 EDT (05:30Z) once, not again at 01:30 EST (06:30Z); then 01:30 EST on the 2nd.
    assert scheduled(autumn) == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_it_makes_a_scheduled_run_with_its_tick_and_keeps_the_schedule_out_of_its_snapshot():
    task = make(schedule="*/5 * * * *", at=utc(2026, 6, 1, 12, 1))
    assert task.next_fire_at == utc(2026, 6, 1, 12, 5)

    assert scheduling.fire_due(utc(2026, 6, 1, 12, 4, 59)) == []
    [run] = scheduling.fire_due(utc(2026, 6, 1, 12, 5, 1))

    run.refresh_from_db()
    assert (run.trigger, run.scheduled_for, run.status) == (
        "schedule",
        utc(2026, 6, 1, 12, 5),
        "queued",
    )
    assert run.attempts.get().status == "queued"
    assert "schedule" not in run.definition and "timezone" not in run.definition
    task.refresh_from_db()
    assert task.next_fire_at == utc(2026, 6, 1, 12, 10)


def test_it_skips_missed_ticks_after_downtime():
    task = make(schedule="0 * * * *", at=utc(2026, 6, 1, 9, 30))
    scheduling.fire_due(utc(2026, 6, 1, 10, 0, 5))

    # Down from 10:30 to 13:20: 11:00, 12:00 and 13:00 were missed.
    assert scheduling.fire_due(utc(2026, 6, 1, 13, 20)) == []
    task.refresh_from_db()
    assert task.next_fire_at == utc(2026, 6, 1, 14)
    scheduling.fire_due(utc(2026, 6, 1, 14, 0, 2))
    assert scheduled(task) == [utc(2026, 6, 1, 10), utc(2026, 6, 1, 14)]


def test_it_runs_the_latest_missed_tick_once_after_downtime():
    task = make(schedule="0 * * * *", misfire_policy="run_once", at=utc(2026, 6, 1, 9, 30))
    scheduling.fire_due(utc(2026, 6, 1, 10, 0, 5))

    [run] = scheduling.fire_due(utc(2026, 6, 1, 13, 20))

    assert run.scheduled_for == utc(2026, 6, 1, 13)
    assert scheduling.fire_due(utc(2026, 6, 1, 13, 21)) == []
    assert scheduled(task) == [utc(2026, 6, 1, 10), utc(2026, 6, 1, 13)]
    task.refresh_from_db()
    assert task.next_fire_at == utc(2026, 6, 1, 14)


def test_it_does_not_catch_up_a_tick_older_than_24_hours():
    # Weekly, Mondays 06:00; down from Sunday to Wednesday: Monday's tick is
    # two days old, beyond the 24 h window even though one period is a week.
    task = make(schedule="0 6 * * 1", misfire_policy="run_once", at=utc(2026, 6, 7))
    assert scheduling.fire_due(utc(2026, 6, 10, 9)) == []
    task.refresh_from_db()
    assert task.next_fire_at == utc(2026, 6, 15, 6)

    # Down for 5 hours only: Monday's tick runs once, late.
    fresh = make("fresh", schedule="0 6 * * 1", misfire_policy="run_once", at=utc(2026, 6, 14))
    runs = scheduling.fire_due(utc(2026, 6, 15, 11))
    # (And the first task's next tick, the same one, five hours late too.)
    assert sorted((r.task_id, r.scheduled_for) for r in runs) == [
        (task.pk, utc(2026, 6, 15, 6)),
        (fresh.pk, utc(2026, 6, 15, 6)),
    ]


def test_a_tick_fired_twice_makes_one_run():
    task = make(schedule="* * * * *", at=utc(2026, 6, 1, 12, 0, 30))
    [run] = scheduling.fire_due(utc(2026, 6, 1, 12, 1, 1))

    # Another process read the task before ours moved it on: it fires the same tick.
    Task.objects.filter(pk=task.pk).update(next_fire_at=utc(2026, 6, 1, 12, 1))
    assert scheduling.fire_due(utc(2026, 6, 1, 12, 1, 2)) == []

    assert list(Run.objects.filter(task=task).values_list("pk", flat=True)) == [run.pk]
    assert run.attempts.count() == 1
    task.refresh_from_db()
    assert task.next_fire_at == utc(2026, 6, 1, 12, 2)


def test_the_database_refuses_a_second_run_for_a_tick():
    task = make(schedule="* * * * *", at=utc(2026, 6, 1, 12))
    [run] = scheduling.fire_due(utc(2026, 6, 1, 12, 1))

    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(
            task=task, task_name=task.name, definition={}, scheduled_for=run.scheduled_for
        )
    # Runs that are not ticks are not held to it.
    lifecycle.trigger_run(task)
    lifecycle.trigger_run(task)
    assert Run.objects.filter(task=task).count() == 3


@pytest.mark.django_db(transaction=True)
def test_two_scheduler_loops_firing_at_once_make_each_tick_once():
    if connection.vendor == "sqlite" and connection.settings_dict["NAME"].startswith(
        "file:memorydb"
    ):
        pytest.skip("threads need a database they can share")
    tasks = [make(f"t{i}", schedule="* * * * *", at=utc(2026, 6, 1, 12, 0, 30)) for i in range(20)]
    barrier = threading.Barrier(2)
    made: list[list[Run]] = []
    errors: list[BaseException] = []

    def loop(now):
        try:
            barrier.wait()
            for _ in range(3):
                made.append(scheduling.fire_due(now))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=loop, args=(utc(2026, 6, 1, 12, 1, s),)) for s in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(len(runs) for runs in made) == 20
    for task in tasks:
        assert scheduled(task) == [utc(2026, 6, 1, 12, 1)]


def test_a_paused_schedule_or_disabled_task_does_not_fire_and_resumes_from_now():
    task = make(schedule="0 * * * *", at=utc(2026, 6, 1, 9, 30), misfire_policy="run_once")
    with clock.frozen(utc(2026, 6, 1, 9, 40)):
        task.schedule_paused = True
        task.save()
    assert task.next_fire_at is None
    assert scheduling.fire_due(utc(2026, 6, 1, 12, 30)) == []

    # Resumed at 12:40: the ticks it had while paused are not misfires.
    with clock.frozen(utc(2026, 6, 1, 12, 40)):
        task.schedule_paused = False
        task.save()
    assert task.next_fire_at == utc(2026, 6, 1, 13)
    assert scheduling.fire_due(utc(2026, 6, 1, 12, 59)) == []

    with clock.frozen(utc(2026, 6, 1, 12, 50)):
        task.enabled = False
        task.save()
    assert scheduling.fire_due(utc(2026, 6, 1, 13, 0, 1)) == []
    assert scheduled(task) == []


def test_no_tick_is_made_while_the_scheduler_is_paused_and_resuming_applies_the_policy():
    skip = make("skip", schedule="0 * * * *", at=utc(2026, 6, 1, 9, 30))
    once = make("once", schedule="0 * * * *", misfire_policy="run_once", at=utc(2026, 6, 1, 9, 30))
    SchedulerState.set_paused(True, by="bob")

    assert scheduling.fire_due(utc(2026, 6, 1, 10, 0, 5)) == []
    assert Run.objects.count() == 0

    SchedulerState.set_paused(False)
    [run] = scheduling.fire_due(utc(2026, 6, 1, 11, 10))
    assert (run.task_id, run.scheduled_for) == (once.pk, utc(2026, 6, 1, 11))
    assert scheduled(skip) == []


def test_editing_the_schedule_moves_its_next_fire_time():
    task = make(schedule="0 * * * *", at=utc(2026, 6, 1, 9, 30))
    with clock.frozen(utc(2026, 6, 1, 9, 45)):
        task.schedule = "50 * * * *"
        task.save()
        assert task.next_fire_at == utc(2026, 6, 1, 9, 50)
        # A rename keeps it.
        Task.objects.filter(pk=task.pk).update(next_fire_at=utc(2026, 6, 1, 9, 50))
    with clock.frozen(utc(2026, 6, 1, 9, 55)):
        task = Task.objects.get(pk=task.pk)
        task.name = "renamed"
        task.save()
    assert Task.objects.get(pk=task.pk).next_fire_at == utc(2026, 6, 1, 9, 50)


def test_the_scheduler_service_fires_schedules_on_real_time():
    # run_once: the real minute may have turned more than the grace ago.
    task = Task.objects.create(
        name="now", command="true", schedule="* * * * *", misfire_policy="run_once"
    )
    Task.objects.filter(pk=task.pk).update(
        next_fire_at=clock.now().replace(second=0, microsecond=0)
    )
    service = SchedulerService()
    assert service.fire_schedules() is True
    assert Run.objects.get(task=task).trigger == "schedule"


def test_an_unreadable_schedule_stops_only_its_own_task(caplog):
    broken = make("broken", schedule="* * * * *", at=utc(2026, 6, 1, 12, 0, 30))
    fine = make("fine", schedule="* * * * *", at=utc(2026, 6, 1, 12, 0, 30))
    # Written around every check (a raw update): cronsim cannot read it.
    Task.objects.filter(pk=broken.pk).update(schedule="99 * * * *")

    [run] = scheduling.fire_due(utc(2026, 6, 1, 12, 1, 1))

    assert run.task_id == fine.pk
    broken.refresh_from_db()
    assert broken.next_fire_at is None
    assert "schedule '99 * * * *' cannot be read" in caplog.text


def test_the_model_refuses_a_bad_schedule_for_the_admins_form():
    from django.core.exceptions import ValidationError

    task = Task(name="x", command="true", schedule="* * *", timezone="Atlantis/Capital")
    with pytest.raises(ValidationError) as caught:
        task.full_clean()
    assert set(caught.value.message_dict) == {"schedule", "timezone"}
