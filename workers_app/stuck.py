"""The stuck-queue alert: ready work that no worker can take, told once per episode.

A label set (an attempt's labels_key, tasks_app.models.labels_key) is stuck
while it has queued attempts that are ready to go (not delayed, not held by
their task's concurrency limit) and no worker taking work (online, approved,
not draining, not revoked: WorkerDirectory.taking_work) has all its labels
(or, for a pinned attempt's "@<id>", is that worker). Busy workers do not
make a queue stuck: that is a queue, not an outage.

An episode starts when a server first sees the set stuck (a StuckQueue row,
unique by labels, so every server agrees on its start) and ends when a pass
finds it servable or empty (the row is deleted). Once it has lasted
SCHEDULER_STUCK_QUEUE_MINUTES, one alert is planned (tasks_app.notify) under
the episode's key: however many servers see it, the unique (episode,
channel, target) of Delivery makes one delivery per target.

Cost: the label sets come from the queue index by a loose scan (one probe per
set, dispatch._queued_classes); only the sets no worker matches are probed
further, once each.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from tasks_app import notify
from tasks_app.models import HELD_UNTIL, Attempt, pin_label
from workers_app.directory import WorkerDirectory
from workers_app.dispatch import _queued_classes
from workers_app.models import StuckQueue


def _labels(key: str) -> frozenset[str]:
    return frozenset(label for label in key.split(",") if label)


def stuck_classes(now) -> dict[str, str]:
    """The label sets stuck now, each with why (for people)."""
    classes = _queued_classes()
    if not classes:
        return {}
    workers = WorkerDirectory().taking_work()
    offered = [worker.labels | {pin_label(worker.id)} for worker in workers]
    unmatched = {key for key in classes if not any(_labels(key) <= labels for labels in offered)}
    stuck = {}
    for key in sorted(unmatched):
        # Ready work: not delayed, not held back by the task's concurrency limit.
        ready = Attempt.objects.filter(
            status=Attempt.Status.QUEUED, labels_key=key, ready_at__lte=now
        ).exclude(ready_at=HELD_UNTIL)
        if ready.exists():
            if not workers:
                why = "no worker is online and taking work"
            elif key.startswith("@") or ",@" in key:
                why = "the worker it is pinned to is not online and taking work"
            else:
                why = "no online worker taking work has all these labels"
            stuck[key] = why
    return stuck


def check(now=None) -> int:
    """One pass: start, alert and end episodes; how many alerts were planned."""
    minutes = settings.SCHEDULER_STUCK_QUEUE_MINUTES
    if not minutes:
        return 0
    now = now or timezone.now()
    stuck = stuck_classes(now)
    # Cleared: a new episode starts if it sticks again.
    StuckQueue.objects.exclude(labels_key__in=list(stuck)).delete()
    if not stuck:
        return 0
    known = dict(
        StuckQueue.objects.filter(labels_key__in=list(stuck)).values_list("labels_key", "since")
    )
    for key in stuck.keys() - known.keys():
        try:
            # Race: another server starting the same episode; its start wins.
            with transaction.atomic():
                StuckQueue.objects.create(labels_key=key, since=now)
        except IntegrityError:
            pass
    due = StuckQueue.objects.filter(
        labels_key__in=list(stuck),
        alerted_at__isnull=True,
        since__lte=now - dt.timedelta(minutes=minutes),
    )
    planned = 0
    for row in due:
        labels = sorted(_labels(row.labels_key))
        episode = f"stuck:{row.labels_key}@{row.since.isoformat()}"
        body = {
            "labels": labels,
            "since": row.since.isoformat(),
            "why": stuck[row.labels_key],
            "queued": Attempt.objects.filter(
                status=Attempt.Status.QUEUED, labels_key=row.labels_key
            ).count(),
        }
        with transaction.atomic():
            planned += notify.plan_alert(episode, body, now)
            StuckQueue.objects.filter(pk=row.pk).update(alerted_at=now)
    return planned
