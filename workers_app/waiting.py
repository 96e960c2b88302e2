"""Why a queued run has not started yet, said in words for its page.

The dashboard's answer to "what is it waiting for?": the first of these
that holds is the reason, in the order dispatch itself would meet them.
"""

from __future__ import annotations

from django.utils import timezone

from tasks_app.models import HELD_UNTIL, Attempt, Run, SchedulerState, Task
from tasks_app.templatetags.sched import seconds_text
from workers_app.models import Worker


def _names(workers: list[Worker], limit: int = 3) -> str:
    shown = ", ".join(f"{w.name} ({w.state})" for w in workers[:limit])
    more = len(workers) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _held(run: Run) -> str:
    """Behind the task's concurrency limit: name the run it waits for."""
    limit = Task.objects.filter(pk=run.task_id).values_list("concurrency_limit", flat=True).first()
    blocking = (
        Run.objects.filter(task_id=run.task_id, status__in=[Run.Status.RUNNING, Run.Status.QUEUED])
        .exclude(pk=run.pk)
        .exclude(attempts__status=Attempt.Status.QUEUED, attempts__ready_at=HELD_UNTIL)
        .order_by("pk")
        .first()
    )
    what = f"run #{blocking.pk} of this task" if blocking else "a run of this task"
    return f"Waiting for {what} to end" + (f" (limit {limit})." if limit else ".")


def _pins(attempts: list[Attempt]) -> set[int]:
    """Ids of the workers these attempts are pinned to (tasks_app.routing)."""
    return {
        int(label[1:])
        for a in attempts
        for label in a.labels_key.split(",")
        if label.startswith("@") and label[1:].isdigit()
    }


def _pinned(pins: set[int]) -> str:
    """Pinned (or broadcast) work waits for its own worker and no other."""
    workers = list(Worker.objects.filter(pk__in=pins).with_busy_slots().order_by("name"))
    if not workers:
        return "Pinned to a worker that no longer exists: it cannot run; cancel it."
    away = [
        w
        for w in workers
        if w.state != Worker.State.ONLINE or w.drain_requested or w.revoked_at is not None
    ]
    if away:
        return (
            f"Pinned to {_names(away)}: it starts when that worker takes work again "
            "(pinned work never goes to another worker)."
        )
    full = [w for w in workers if w.busy >= w.capacity]
    if full:
        w = full[0]
        return (
            f"Pinned to {w.name}, which is busy ({min(w.busy, w.capacity)} of {w.capacity} "
            "slots); it starts when a slot frees up."
        )
    return "Being dispatched to a free slot."


def why_waiting(run: Run, attempts: list[Attempt]) -> str:
    """The reason a run that is not final and not running is still waiting."""
    live = [a for a in attempts if not a.is_final]
    assigned = [a for a in live if a.status == Attempt.Status.ASSIGNED]
    if assigned:
        first = assigned[0]
        step = "accepted it" if first.accepted_at else "has not accepted it yet"
        return f"Assigned to {first.worker_name}, which {step}; waiting for the command to start."
    state = SchedulerState.objects.filter(pk=1, paused=True).first()
    if state is not None:
        by = f" by {state.paused_by}" if state.paused_by else ""
        return f"The scheduler is paused{by}: nothing new is dispatched until it is resumed."
    now = timezone.now()
    if live and all(a.is_held for a in live):
        return _held(run)
    waiting = [a for a in live if a.status == Attempt.Status.QUEUED and a.ready_at > now]
    if waiting and len(waiting) == len(live):
        if run.run_at and all(a.try_number == 1 and a.ready_at == run.run_at for a in waiting):
            at = timezone.localtime(run.run_at).strftime("%Y-%m-%d %H:%M:%S %Z")
            return f"Scheduled to start at {at}."
        wait = seconds_text((min(a.ready_at for a in waiting) - now).total_seconds())
        return f"Waiting out its retry backoff: eligible again in {wait}."
    pins = _pins([a for a in live if a.status == Attempt.Status.QUEUED])
    if pins:
        return _pinned(pins)
    labels = set(run.definition.get("labels") or ())
    wanted = f"the labels {', '.join(sorted(labels))}" if labels else "no particular labels"
    workers = [
        w
        for w in Worker.objects.filter(revoked_at__isnull=True).with_busy_slots().order_by("name")
        if labels <= set(w.labels or ())
    ]
    if not workers:
        if labels:
            return f"No worker has {wanted}: add one with them, or change the task's labels."
        return "No worker is registered yet: add one on the Workers page."
    online = [w for w in workers if w.state == Worker.State.ONLINE and not w.drain_requested]
    if not online:
        return f"No worker with {wanted} takes new work: {_names(workers)}."
    busy = sum(min(w.busy, w.capacity) for w in online)
    slots = sum(w.capacity for w in online)
    if busy >= slots:
        if len(online) == 1:
            return (
                f"The only online worker with {wanted}, {online[0].name}, is busy "
                f"({busy} of {slots} slots); it starts when a slot frees up."
            )
        return (
            f"All {len(online)} online workers with {wanted} are busy "
            f"({busy} of {slots} slots); it starts when a slot frees up."
        )
    return "Being dispatched to a free slot."
