"""Enrolling agents: an enrollment token buys a worker its own credential."""

from __future__ import annotations

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from tasks_app import lifecycle, tokens
from workers_app import dispatch
from workers_app.exceptions import EnrollmentRefused
from workers_app.models import EnrollmentToken, Worker


def register(
    raw_token: str, *, name: str, hostname: str, capacity: int, labels: list[str]
) -> tuple[Worker, str]:
    """Create (or re-enroll) a worker and return it with its new credential.

    A worker that is not connected and not revoked may be enrolled again
    under the same name, e.g. after its state dir was lost: it keeps its
    history and gets a fresh credential, and the old one stops working.
    """
    with transaction.atomic():
        token = EnrollmentToken.objects.filter(token_hash=tokens.digest(raw_token)).first()
        if token is None or not token.is_usable:
            raise EnrollmentRefused("enrollment token is unknown, expired or revoked")
        credential, credential_hash = tokens.mint("wkr")
        worker = Worker.objects.select_for_update().filter(name=name).first()
        if worker is not None and (worker.state == Worker.State.ONLINE or worker.channel_name):
            raise EnrollmentRefused(f"a worker named {name!r} is connected; choose another --name")
        if worker is not None and worker.revoked_at is not None:
            # Revoking must stick: an enrollment token (reusable, and in shell
            # histories) must not bring a revoked worker back.
            raise EnrollmentRefused(
                f"worker {name!r} was revoked; an operator must delete it before the name is reused"
            )
        if worker is None:
            worker = Worker(name=name)
        worker.hostname = hostname
        worker.capacity = capacity
        worker.labels = labels
        worker.credential_hash = credential_hash
        worker.state = Worker.State.OFFLINE
        worker.save()
        EnrollmentToken.objects.filter(pk=token.pk).update(uses=F("uses") + 1)
    return worker, credential


def revoke(worker: Worker) -> None:
    """The credential stops working at the next handshake; a live socket is closed."""
    Worker.objects.filter(pk=worker.pk).update(
        revoked_at=timezone.now(), state=Worker.State.DISABLED
    )
    # A revoked worker never takes work again: work pinned to it can never run.
    lifecycle.fail_pinned(worker.pk, worker.name, "revoked")
    # Nothing new for it from now on, not only once its socket has closed.
    transaction.on_commit(lambda: dispatch.board.mark([worker.pk]), robust=True)


def authenticate(credential: str) -> Worker | None:
    if not credential:
        return None
    return Worker.objects.filter(
        credential_hash=tokens.digest(credential), revoked_at__isnull=True
    ).first()
