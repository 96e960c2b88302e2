"""Enrolling agents: an enrollment token buys a worker its own credential."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from tasks_app import events, lifecycle, tokens
from workers_app import dispatch
from workers_app.exceptions import EnrollmentRefused
from workers_app.models import EnrollmentToken, Worker


def register(
    raw_token: str, *, name: str, hostname: str, capacity: int, labels: list[str]
) -> tuple[Worker, str]:
    """Create (or re-enroll) a worker and return it with its new credential.

    A new worker is pending until an admin approves it (approve()), unless
    the token auto-approves: then what the agent asks for is what it gets.
    A name that is taken may be enrolled again (its agent lost its state dir)
    only with an admin's consent (allow_reenroll()): the worker keeps its
    history, its approval, the labels and capacity decided for it and a
    disabled state, and gets a fresh credential; the old one stops working.
    """
    now = timezone.now()
    with transaction.atomic():
        # Race: two agents enrolling with the last use of a token at the same
        # moment. The conditional UPDATE is the arbiter: the database applies
        # them one after the other (PostgreSQL re-checks the WHERE of the
        # second against the row the first committed), so only one sees a use
        # left and the other counts 0 rows. Never read `uses` and then save().
        counted = (
            EnrollmentToken.objects.filter(
                token_hash=tokens.digest(raw_token), revoked_at__isnull=True, expires_at__gt=now
            )
            .filter(Q(max_uses__isnull=True) | Q(uses__lt=F("max_uses")))
            .update(uses=F("uses") + 1)
        )
        if not counted:
            raise EnrollmentRefused("enrollment token is unknown, expired, used up or revoked")
        token = EnrollmentToken.objects.get(token_hash=tokens.digest(raw_token))
        credential, credential_hash = tokens.mint("wkr")
        worker = Worker.objects.select_for_update().filter(name=name).first()
        again = worker is not None
        if worker is None:
            worker = Worker(name=name, state=Worker.State.PENDING, approved_at=None)
            if token.auto_approve:
                worker.state, worker.approved_at = Worker.State.OFFLINE, now
                worker.approved_by_id = token.created_by_id
                worker.labels, worker.capacity = labels, capacity
        else:
            _check_reenroll(worker)
            if worker.state not in (Worker.State.DISABLED, Worker.State.PENDING):
                worker.state = Worker.State.OFFLINE
            worker.reenroll_allowed = False
        worker.hostname = hostname
        worker.requested_labels = labels
        worker.requested_capacity = capacity
        worker.credential_hash = credential_hash
        worker.save()
        rows = [events.Row(events.WORKER_ENROLLED, worker_id=worker.pk, data={"name": name})]
        if again:
            rows[0].data["again"] = True
        elif worker.approved_at is not None:
            approval = {"name": name, "by": "its enrollment token"}
            rows.append(events.Row(events.WORKER_APPROVED, worker_id=worker.pk, data=approval))
        events.record_many(rows)
    return worker, credential


def _check_reenroll(worker: Worker) -> None:
    """Refuse to enroll over an existing worker unless an admin allowed it once."""
    name = worker.name
    if worker.revoked_at is not None:
        # Revoking must stick: an enrollment token (reusable, and in shell
        # histories) must not bring a revoked worker back.
        raise EnrollmentRefused(
            f"worker {name!r} was revoked; an operator must delete it before the name is reused"
        )
    if worker.state == Worker.State.ONLINE or worker.channel_name:
        raise EnrollmentRefused(f"a worker named {name!r} is connected; choose another --name")
    if not worker.reenroll_allowed:
        # Otherwise anyone holding a token could take over a trusted worker's
        # name, and with it its labels, pinned work and approval.
        raise EnrollmentRefused(
            f"a worker named {name!r} exists; an admin must allow its re-enrollment "
            "(Workers page, 'Allow re-enrollment') or choose another --name"
        )


def approve(worker: Worker, *, user, labels: list[str], capacity: int) -> bool:
    """An admin lets a pending worker take work, with these labels and capacity.

    Returns False if it was approved already (or revoked) meanwhile.
    """
    with transaction.atomic():
        # Race: two admins approving at once (with different labels), or an
        # approval landing while the worker is revoked: only a row still
        # pending moves, so the first decision stands.
        approved = Worker.objects.filter(
            pk=worker.pk, approved_at__isnull=True, revoked_at__isnull=True
        ).update(
            approved_at=timezone.now(),
            approved_by=user if user is not None and user.is_authenticated else None,
            labels=labels,
            capacity=capacity,
        )
        if not approved:
            return False
        by = user.get_username() if user is not None and user.is_authenticated else ""
        events.record(events.WORKER_APPROVED, worker_id=worker.pk, name=worker.name, by=by)
        # Race: its agent connecting or going away right now. Judged in the same
        # statement from the row as it is (a disabled worker stays disabled).
        Worker.objects.filter(pk=worker.pk, state=Worker.State.PENDING).update(
            state=Case(
                When(channel_name="", then=Value(Worker.State.OFFLINE)),
                When(drain_requested=True, then=Value(Worker.State.DRAINING)),
                default=Value(Worker.State.ONLINE),
            )
        )
        transaction.on_commit(lambda: dispatch.board.mark([worker.pk]), robust=True)
        transaction.on_commit(dispatch.wake, robust=True)
    return True


def allow_reenroll(worker: Worker) -> bool:
    """An admin's consent to one enrollment under this worker's name, for a node
    that lost its credential: so only while it is not connected. Its agent
    saying hello again with the old credential voids it (liveness.hello_many).
    False when the worker is connected or revoked."""
    # Race: the agent connecting right now; judged on the row as it is.
    return bool(
        Worker.objects.filter(pk=worker.pk, revoked_at__isnull=True, channel_name="").update(
            reenroll_allowed=True
        )
    )


def revoke(worker: Worker) -> None:
    """The credential stops working at the next handshake; a live socket is closed."""
    # Race: two admins revoking at once; the first records it (and its time stays).
    if Worker.objects.filter(pk=worker.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), state=Worker.State.DISABLED
    ):
        events.record(events.WORKER_REVOKED, worker_id=worker.pk, name=worker.name)
    else:
        Worker.objects.filter(pk=worker.pk).update(state=Worker.State.DISABLED)
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
