"""Cron firing: the scheduler service's duty of turning due ticks into runs.

A pass reads only the tasks whose `next_fire_at` has come (an index range),
creates their runs through the ordinary trigger path (trigger `schedule`,
`scheduled_for` the tick), and moves each task's `next_fire_at` on. Several
server processes may run passes at once: the unique (task, scheduled_for)
index makes a tick's run once (the loser inserts nothing), and moving
`next_fire_at` is a conditional UPDATE.

Missed ticks. A tick is on time when the pass sees it within MISFIRE_GRACE;
older ones were missed (the server was down, or the scheduler paused: no
ticks are made while it is paused). Per task:
- `skip`: missed ticks make no run; the schedule goes on from now.
- `run_once`: one run for the latest missed tick, if it is no older than
  the smaller of 24 hours and one period of the schedule (the time from that
  tick to the next one); older than that, it is skipped too.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from django.db.models import Q

from tasks_app import clock, cron, lifecycle
from tasks_app.batchsql import atomic
from tasks_app.exceptions import TaskError
from tasks_app.models import MisfirePolicy, Run, SchedulerState, Task

log = logging.getLogger(__name__)

# A tick seen this long after its time is still on time (a slow pass, a
# busy loop); later than that it counts as missed.
MISFIRE_GRACE = dt.timedelta(seconds=30)
# run_once never catches up a tick older than this.
MAX_CATCH_UP = dt.timedelta(hours=24)
# Tasks handled per pass; the rest are due still and come next pass.
BATCH = 500


@dataclass(frozen=True)
class Decision:
    fire_at: dt.datetime | None  # the tick to make a run for, if any
    next_fire_at: dt.datetime | None  # when the task fires after that


def decide(task: Task, now: dt.datetime) -> Decision:
    """What a due task does at `now`: which tick fires (if any), and what comes next."""
    latest = cron.latest_fire(task.schedule, task.timezone, now)
    following = cron.next_fire(task.schedule, task.timezone, now)
    if latest is None or latest < task.next_fire_at:
        # Not due after all (the schedule changed under us): just move on.
        return Decision(None, following)
    if now - latest <= MISFIRE_GRACE:
        return Decision(latest, following)
    if task.misfire_policy == MisfirePolicy.RUN_ONCE:
        period = cron.next_fire(task.schedule, task.timezone, latest)
        window = min(MAX_CATCH_UP, (period - latest) if period else MAX_CATCH_UP)
        if now - latest <= window:
            return Decision(latest, following)
    return Decision(None, following)


def fire_due(now: dt.datetime | None = None) -> list[Run]:
    """Create the runs of the cron ticks due at `now` (default: the clock's
    now); the runs created, each once however many processes call this."""
    now = now or clock.now()
    if SchedulerState.is_paused():
        # Paused is downtime for the schedules too: queued runs would only
        # pile up. On resume, each task's misfire policy decides.
        return []
    with atomic():
        due = list(
            lifecycle._locked(
                Task.objects.filter(next_fire_at__lte=now).order_by("next_fire_at", "id")
            )[:BATCH]
        )
        requests = []
        moves = []
        for task in due:
            if not task.schedule or task.schedule_paused or not task.enabled:
                # Changed without save() (a bulk update): it does not fire.
                moves.append((task, None))
                continue
            try:
                decision = decide(task, now)
            except Exception:
                # One unreadable schedule (written around the checks) must not
                # stop every other task's ticks: it stops firing, and says so.
                log.exception("task %s: schedule %r cannot be read", task.pk, task.schedule)
                moves.append((task, None))
                continue
            moves.append((task, decision.next_fire_at))
            if decision.fire_at is not None:
                requests.append(
                    lifecycle.TriggerRequest(
                        task.pk, Run.Trigger.SCHEDULE, scheduled_for=decision.fire_at
                    )
                )
            elif task.next_fire_at < now - MISFIRE_GRACE:
                log.info("task %s: missed tick(s) since %s skipped", task.pk, task.next_fire_at)
        created: list[Run] = []
        for request, result in zip(requests, lifecycle.trigger_runs(requests), strict=True):
            if isinstance(result, TaskError):
                log.warning("task %s: scheduled run refused: %s", request.task_id, result)
            else:
                created += result
        for task, next_fire_at in moves:
            # Race: the task edited meanwhile (save() set a new next_fire_at)
            # or another process moved it already: only the value we read moves.
            Task.objects.filter(Q(pk=task.pk), Q(next_fire_at=task.next_fire_at)).update(
                next_fire_at=next_fire_at
            )
    return created
