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


def dispatch(limit: int = BATCH) -> list[tuple[int, int]]:
    """Assign as many queued attempts as there are matching free slots.

    Returns (worker id, attempt id) pairs; the assign frames are sent after commit.
    """
    with _lock, transaction.atomic():
        if lifecycle.is_paused():
            return []
        now = timezone.now()
        queued = (
            Attempt.objects.filter(status=Attempt.Status.QUEUED)
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .select_related("run")
        )
        if connection.features.has_select_for_update_skip_locked:
            queued = queued.select_for_update(skip_locked=True, of=("self",))
        queued = list(queued.order_by("id")[:limit])
        if not queued:
            return []
        workers = list(
            with_busy_slots(
                Worker.objects.filter(state=Worker.State.ONLINE, revoked_at__isnull=True)
            ).order_by("id")
        )
        free = {w.pk: w.capacity - w.busy for w in workers}
        label_sets = {w.pk: set(w.labels) for w in workers}
        assigned: list[tuple[Worker, Attempt]] = []
        for attempt in queued:
            wanted = set(attempt.run.definition.get("labels") or [])
            candidates = [w for w in workers if free[w.pk] > 0 and wanted <= label_sets[w.pk]]
            if not candidates:
                continue
            # Least loaded first (by share of capacity in use), so work spreads over nodes.
            worker = min(candidates, key=lambda w: ((w.capacity - free[w.pk]) / w.capacity, w.pk))
            if lifecycle.assign(attempt.pk, worker.pk, worker.name):
                free[worker.pk] -= 1
                assigned.append((worker, attempt))
        if assigned:
            frames = [(w.group_name, protocol.assign(a)) for w, a in assigned]
            transaction.on_commit(lambda: send_frames(frames))
    return [(w.pk, a.pk) for w, a in assigned]


def send_frames(frames: list[tuple[str, dict]]) -> None:
    """Hand frames to the consumers of the named worker groups."""
    layer = get_channel_layer()
    for group, frame in frames:
        async_to_sync(layer.group_send)(group, {"type": "agent.frame", "frame": frame})


def send_close(group: str) -> None:
    """Ask the consumer(s) of a worker to close its socket (after a revoke)."""
    async_to_sync(get_channel_layer().group_send)(group, {"type": "agent.close"})


def frames_for_worker(worker_id: int) -> list[dict]:
    """Assign frames for every attempt assigned to a worker but not started yet."""
    attempts = Attempt.objects.filter(
        worker_id=worker_id, status=Attempt.Status.ASSIGNED
    ).select_related("run")
    return [protocol.assign(a) for a in attempts.order_by("id")]


def on_stop_requested(sender, attempts: list[tuple[int, int]], **kwargs) -> None:
    """Send cancel frames to the agents running these attempts."""
    frames = [
        (f"worker.{worker_id}", protocol.cancel(pk)) for worker_id, pk in attempts if worker_id
    ]
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
