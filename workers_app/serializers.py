from workers_app.models import Worker


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
        "requested_labels": worker.requested_labels,
        "requested_capacity": worker.requested_capacity,
        "approved_at": worker.approved_at.isoformat() if worker.approved_at else None,
    }
