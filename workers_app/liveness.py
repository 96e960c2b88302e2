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
from workers_app import dispatch, protocol
from workers_app.models import Worker


@dataclass
class Reconciled:
    """What a hello changed: attempts lost, assignments to send again."""

    worker: Worker
    lost: list[int] = field(default_factory=list)
    resend: list[dict] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)


def hello(worker_id: int, channel_name: str, frame: dict) -> Reconciled:
    """Bring a worker online and reconcile what it says it runs with what we think."""
    now = timezone.now()
    with transaction.atomic():
        worker = Worker.objects.select_for_update().get(pk=worker_id)
        previous = worker.channel_name
        worker.hostname = (frame.get("hostname") or worker.hostname)[:255]
        worker.agent_version = (frame.get("agent_version") or "")[:50]
        worker.capacity = frame["capacity"]
        if "labels" in frame:  # checked by protocol.parse
            worker.labels = frame["labels"]
        if worker.state != Worker.State.DISABLED:
            draining = frame.get("draining") or worker.drain_requested
            worker.state = Worker.State.DRAINING if draining else Worker.State.ONLINE
        worker.channel_name = channel_name
        if previous and previous != channel_name:
            # Only one connection serves a worker: the older one is closed, so
            # that an attempt can never be handed to two sockets.
            transaction.on_commit(lambda: dispatch.send_close(previous, protocol.CLOSE_REPLACED))
        worker.last_heartbeat = now
        worker.connected_at = now
        worker.save()
        running = set(frame["running"])
        spooled = set(frame.get("spooled", []))
        assigned = set(
            Attempt.objects.filter(worker_id=worker_id, status=Attempt.Status.ASSIGNED).values_list(
                "pk", flat=True
            )
        )
        # An attempt we think is running there but the agent neither runs nor
        # holds a result for has died with a previous agent process: say so
        # now, not after a timeout.
        lost = lifecycle.mark_lost(
            worker_id,
            "worker lost: the agent reconnected without it",
            keep=list(running | spooled | assigned),
        )
        active = set(
            Attempt.objects.filter(worker_id=worker_id, status__in=Attempt.ACTIVE).values_list(
                "pk", flat=True
            )
        )
        # Runs there that are over for us (declared lost and retried, cancelled,
        # never its own): a zombie must not overlap the retry, so stop it.
        cancel = sorted((running - active) | set(lifecycle.pending_stops(worker_id)))
        # Assigned but never started: the assign frame may have been lost with
        # the previous socket, so send it again (the agent ignores duplicates).
        resend = [
            f
            for f in dispatch.frames_for_worker(worker_id)
            if f["attempt"] not in running and f["attempt"] not in cancel
        ]
    return Reconciled(worker=worker, lost=lost, resend=resend, cancel=cancel)


def heartbeat(worker_id: int, draining: bool = False) -> None:
    Worker.objects.filter(pk=worker_id).update(last_heartbeat=timezone.now())
    if draining:
        Worker.objects.filter(pk=worker_id, state=Worker.State.ONLINE).update(
            state=Worker.State.DRAINING
        )


def apply_state(worker: Worker, state: str) -> None:
    """Drain, resume, disable or enable a worker (dashboard or API), and tell its agent.

    Draining and disabled workers get no new work; what they run finishes.
    """
    with transaction.atomic():
        workers = Worker.objects.filter(pk=worker.pk)
        if state == Worker.State.DRAINING:
            workers.update(drain_requested=True)
            workers.filter(state=Worker.State.ONLINE).update(state=state)
            frame = "drain"
        elif state == Worker.State.DISABLED:
            workers.update(state=state)
            frame = "drain"
        elif state == Worker.State.ONLINE:
            # Online if its socket is up, else offline until it says hello.
            workers.update(drain_requested=False)
            live = workers.filter(revoked_at__isnull=True)
            live.exclude(channel_name="").update(state=Worker.State.ONLINE)
            live.filter(channel_name="").update(state=Worker.State.OFFLINE)
            frame = "resume"
            transaction.on_commit(dispatch.dispatch)
        else:
            raise ValueError(f"cannot set a worker to {state!r}")
        transaction.on_commit(lambda: dispatch.send_frames([(worker.pk, {"type": frame})]))


def disconnected(worker_id: int, channel_name: str) -> None:
    """The socket closed. Its attempts stay running: the agent may come back in time."""
    # Race: a newer connection of the same agent may already have said hello;
    # only the consumer that still owns the worker may take it offline. A
    # disabled worker stays disabled; an operator's drain is kept in
    # drain_requested and restored by the next hello.
    Worker.objects.filter(pk=worker_id, channel_name=channel_name).exclude(
        state=Worker.State.DISABLED
    ).update(state=Worker.State.OFFLINE)
    Worker.objects.filter(pk=worker_id, channel_name=channel_name).update(channel_name="")


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
    seconds = int(settings.SCHEDULER_LOST_AFTER_S)
    for worker in Worker.objects.filter(silent).filter(has_work).distinct():
        # Race: a heartbeat landing now; the UPDATE only matches if it did not.
        unchanged = Worker.objects.filter(pk=worker.pk, last_heartbeat=worker.last_heartbeat)
        if worker.state == Worker.State.DISABLED:
            still_silent = unchanged.exists()
        else:
            still_silent = unchanged.update(state=Worker.State.OFFLINE)
        if not still_silent:
            continue
        lifecycle.mark_lost(worker.pk, f"worker lost: no heartbeat for {seconds}s")
        reaped.append(worker.pk)
        if worker.channel_name:
            # A socket that is open but silent (a hung agent): close it, so the
            # agent must say hello again and be reconciled.
            dispatch.send_close(worker.channel_name, protocol.CLOSE_SILENT)
    # Active attempts whose worker row is gone (deleted past the signal, e.g.
    # with raw SQL) would otherwise stay running forever.
    lifecycle.mark_lost(None, "worker lost: the worker was deleted")
    return reaped


def on_worker_deleted(sender, instance: Worker, **kwargs) -> None:
    """A deleted worker reports nothing any more: its attempts are lost now
    (and retried per policy) instead of staying running with no worker."""
    lifecycle.mark_lost(instance.pk, "worker lost: the worker was deleted")
    dispatch.send_close(instance.channel_name, protocol.CLOSE_REVOKED)
