from django.db.models import Count, Q

from tasks_app.models import Attempt
from workers_app.models import Worker


def with_busy_slots(workers):
    """Annotate each worker with the number of slots its active attempts use."""
    return workers.annotate(busy=Count("attempts", filter=Q(attempts__status__in=Attempt.ACTIVE)))


def worker_json(worker: Worker, *, busy: int) -> dict:
    return {
        "id": worker.pk,
        "name": worker.name,
        "hostname": worker.hostname,
        "state": worker.state,
        "labels": worker.labels,
        "capacity": worker.capacity,
        "slots_in_use": busy,
        "last_heartbeat": worker.last_heartbeat.isoformat() if worker.last_heartbeat else None,
        "agent_version": worker.agent_version,
        "revoked": worker.revoked_at is not None,
    }
