"""How busy each worker is: slots in use of its capacity and attempts finished lately.

For the overview page. Three grouped queries for the whole fleet (the
workers, their active attempts, their attempts finished in the last hour),
whatever its size and history: the active ones come off the attempt_queue
index (status first), the finished ones off attempt_finished (a range of the
last hour), never a scan of every attempt a worker ever ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count

from tasks_app.models import Attempt
from workers_app.models import Worker

RECENT = timedelta(hours=1)
SHOWN = 8


@dataclass
class WorkerLoad:
    worker: Worker
    busy: int
    finished: int  # attempts it finished in the last hour

    @property
    def slots(self) -> int:
        return self.worker.slots

    @property
    def share(self) -> float:
        return self.busy / self.slots if self.slots else 0.0


def fleet_load(now: datetime) -> list[WorkerLoad]:
    """Every worker that can take work (approved, not revoked, not disabled)."""
    workers = list(
        Worker.objects.filter(approved_at__isnull=False, revoked_at__isnull=True)
        .exclude(state=Worker.State.DISABLED)
        .only("id", "name", "state", "capacity", "requested_capacity", "approved_at")
    )
    busy = dict(
        Attempt.objects.filter(status__in=Attempt.ACTIVE, worker_id__isnull=False)
        .values_list("worker_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    finished = dict(
        Attempt.objects.filter(finished_at__gte=now - RECENT, worker_id__isnull=False)
        .values_list("worker_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    return [WorkerLoad(w, busy.get(w.pk, 0), finished.get(w.pk, 0)) for w in workers]


def busiest_and_idle(now: datetime, shown: int = SHOWN) -> tuple[list, list]:
    """The busiest workers (largest share of slots in use, then most finished)
    and the idle ones (online, nothing running; least finished first)."""
    loads = fleet_load(now)
    busy = sorted(
        (load for load in loads if load.busy),
        key=lambda load: (-load.share, -load.finished, load.worker.name),
    )
    idle = sorted(
        (load for load in loads if not load.busy and load.worker.state == Worker.State.ONLINE),
        key=lambda load: (load.finished, load.worker.name),
    )
    return busy[:shown], idle[:shown]
