"""Who is online: hellos, heartbeats, disconnects and lost workers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from tasks_app import lifecycle
from tasks_app.models import Attempt
from workers_app import dispatch
from workers_app.models import Worker


@dataclass
class Reconciled:
    """What a hello changed: attempts lost, assignments to send again."""

    worker: Worker
    lost: list[int] = field(default_factory=list)
    resend: list[dict] = field(default_factory=list)


def hello(worker_id: int, channel_name: str, frame: dict) -> Reconciled:
    """Bring a worker online and reconcile what it says it runs with what we think."""
    now = timezone.now()
    with transaction.atomic():
        worker = Worker.objects.select_for_update().get(pk=worker_id)
        worker.hostname = frame.get("hostname") or worker.hostname
        worker.agent_version = (frame.get("agent_version") or "")[:50]
        worker.capacity = frame["capacity"]
        labels = frame.get("labels")
        if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
            worker.labels = labels[:32]
        if worker.state in (Worker.State.OFFLINE, Worker.State.ONLINE):
            worker.state = Worker.State.ONLINE
        worker.channel_name = channel_name
        worker.last_heartbeat = now
        worker.connected_at = now
        worker.save()
        running = set(frame["running"])
        # An attempt we think is running there but the agent does not list has
        # died with a previous agent process: say so now, not after a timeout.
        lost = lifecycle.mark_lost(
            worker_id,
            "worker lost: the agent reconnected without it",
            keep=list(running)
            + list(
                Attempt.objects.filter(
                    worker_id=worker_id, status=Attempt.Status.ASSIGNED
                ).values_list("pk", flat=True)
            ),
        )
        # Assigned but never started: the assign frame may have been lost with
        # the previous socket, so send it again (the agent ignores duplicates).
        resend = [f for f in dispatch.frames_for_worker(worker_id) if f["attempt"] not in running]
    return Reconciled(worker=worker, lost=lost, resend=resend)


def heartbeat(worker_id: int) -> None:
    Worker.objects.filter(pk=worker_id).update(last_heartbeat=timezone.now())


def disconnected(worker_id: int, channel_name: str) -> None:
    """The socket closed. Its attempts stay running: the agent may come back in time."""
    # Race: a newer connection of the same agent may already have said hello;
    # only the consumer that still owns the worker may take it offline.
    Worker.objects.filter(pk=worker_id, channel_name=channel_name).update(
        state=Worker.State.OFFLINE, channel_name=""
    )
    Worker.objects.filter(
        pk=worker_id, channel_name=channel_name, state=Worker.State.DRAINING
    ).update(channel_name="")


def reap_lost(now: dt.datetime | None = None) -> list[int]:
    """Workers silent for longer than SCHEDULER_LOST_AFTER_S: offline, attempts lost."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.SCHEDULER_LOST_AFTER_S)
    # A worker that never heartbeated counts from when it connected or was created.
    silent = Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)
    has_work = Q(state__in=[Worker.State.ONLINE, Worker.State.DRAINING]) | Q(
        attempts__status__in=Attempt.ACTIVE
    )
    reaped = []
    for worker in Worker.objects.filter(silent).filter(has_work).distinct():
        # Race: a heartbeat landing now; the UPDATE only matches if it did not.
        Worker.objects.filter(pk=worker.pk, last_heartbeat=worker.last_heartbeat).exclude(
            state=Worker.State.DISABLED
        ).update(state=Worker.State.OFFLINE)
        seconds = int(settings.SCHEDULER_LOST_AFTER_S)
        if lifecycle.mark_lost(worker.pk, f"worker lost: no heartbeat for {seconds}s"):
            reaped.append(worker.pk)
    return reaped
