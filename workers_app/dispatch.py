"""Matching queued attempts to free slots of online workers.

The database decides: an attempt is assigned by a conditional UPDATE
(tasks_app.lifecycle.assign) inside one transaction that also counts the
busy slots, so no worker is ever given more than its capacity. The channel
message that carries the assignment to the agent's consumer is only a
wake-up; an agent that never gets it is reconciled on its next hello.
"""

from __future__ import annotations

import logging
import threading

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from tasks_app import lifecycle
from tasks_app.models import Attempt
from workers_app import protocol
from workers_app.models import Worker
from workers_app.serializers import with_busy_slots

log = logging.getLogger(__name__)

# One dispatcher at a time inside this process; across processes the IMMEDIATE
# (SQLite) transaction or the row locks (PostgreSQL) serialise them.
_lock = threading.Lock()
BATCH = 500
# Rows one pass may look at, so a deep queue of unrunnable work stays cheap.
MAX_SCAN = 5000


def dispatch(limit: int = BATCH, max_scan: int = MAX_SCAN) -> list[tuple[int, int]]:
    """Assign as many queued attempts as there are matching free slots.

    Scans the queue oldest first in batches of `limit`, past attempts nobody
    can take (labels no free worker has), until the free slots run out or
    `max_scan` rows were looked at. Returns (worker id, attempt id) pairs;
    the assign frames are sent after commit.
    """
    assigned: list[tuple[Worker, Attempt]] = []
    with _lock, transaction.atomic():
        if lifecycle.is_paused():
            return []
        workers = list(
            with_busy_slots(
                Worker.objects.filter(state=Worker.State.ONLINE, revoked_at__isnull=True)
            ).order_by("id")
        )
        free = {w.pk: w.capacity - w.busy for w in workers}
        label_sets = {w.pk: set(w.labels) for w in workers}
        now = timezone.now()
        after = 0
        scanned = 0
        while sum(free.values()) > 0 and scanned < max_scan:
            batch = _queued_batch(now, after, limit)
            if not batch:
                break
            scanned += len(batch)
            after = batch[-1].pk
            for attempt in batch:
                wanted = set(attempt.run.definition.get("labels") or [])
                candidates = [w for w in workers if free[w.pk] > 0 and wanted <= label_sets[w.pk]]
                if not candidates:
                    continue
                # Least loaded first (by share of capacity in use), so work spreads over nodes.
                worker = min(
                    candidates, key=lambda w: ((w.capacity - free[w.pk]) / w.capacity, w.pk)
                )
                if lifecycle.assign(attempt.pk, worker.pk, worker.name):
                    free[worker.pk] -= 1
                    assigned.append((worker, attempt))
            if len(batch) < limit:
                break
        if assigned:
            frames = [(w.pk, protocol.assign(a)) for w, a in assigned]
            transaction.on_commit(lambda: send_frames(frames))
    return [(w.pk, a.pk) for w, a in assigned]


def _queued_batch(now, after: int, limit: int) -> list[Attempt]:
    queued = (
        Attempt.objects.filter(
            status=Attempt.Status.QUEUED, pk__gt=after, run__cancel_requested_at__isnull=True
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .select_related("run")
    )
    if connection.features.has_select_for_update_skip_locked:
        # Another server process dispatching at the same time skips what we hold.
        queued = queued.select_for_update(skip_locked=True, of=("self",))
    return list(queued.order_by("id")[:limit])


def send_frames(frames: list[tuple[int, dict]]) -> None:
    """Hand (worker id, frame) pairs to the consumer that currently serves each worker.

    Addressed to the one connection recorded in Worker.channel_name, not a
    group: an old socket of the same worker never sees them, and there is no
    group membership to expire. One layer message per worker carries all its
    frames, so a burst of assignments does not overflow the channel's queue.
    A worker without a connection gets nothing: its next hello reconciles.
    """
    by_worker: dict[int, list[dict]] = {}
    for worker_id, frame in frames:
        by_worker.setdefault(worker_id, []).append(frame)
    if not by_worker:
        return
    channels = dict(
        Worker.objects.filter(pk__in=by_worker)
        .exclude(channel_name="")
        .values_list("pk", "channel_name")
    )
    layer = get_channel_layer()
    for worker_id, channel in channels.items():
        async_to_sync(layer.send)(channel, {"type": "agent.frames", "frames": by_worker[worker_id]})


def send_close(channel: str, code: int) -> None:
    """Ask one agent connection to close (revoked, replaced, reaped)."""
    if channel:
        async_to_sync(get_channel_layer().send)(channel, {"type": "agent.close", "code": code})


def frames_for_worker(worker_id: int) -> list[dict]:
    """Assign frames for every attempt assigned to a worker but not started yet."""
    attempts = Attempt.objects.filter(
        worker_id=worker_id, status=Attempt.Status.ASSIGNED
    ).select_related("run")
    return [protocol.assign(a) for a in attempts.order_by("id")]


def on_stop_requested(sender, attempts: list[tuple[int, int]], **kwargs) -> None:
    """Send cancel frames to the agents running these attempts."""
    frames = [(worker_id, protocol.cancel(pk)) for worker_id, pk in attempts if worker_id]
    try:
        send_frames(frames)
    except Exception:
        # The agent's next hello (or the timeout backstop) catches up; the
        # cancel itself is recorded in the database already.
        log.exception("sending cancel frames failed")


def on_work_queued(sender, **kwargs) -> None:
    try:
        dispatch()
    except Exception:
        # The service's periodic pass dispatches whatever this missed; a failed
        # wake-up must not turn the user's "Run now" into an error page.
        log.exception("dispatch after queueing failed; the service will retry")
