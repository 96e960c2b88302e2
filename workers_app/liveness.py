"""Who is online: hellos, signs of life, disconnects and lost workers.

Heartbeats cost no transaction of their own. Every message from an agent is a
sign of life, noted in SEEN when the message arrives (before it waits for the
writer), and a consumer that holds back reading (backpressure) keeps noting
its agent; the writer copies SEEN to Worker.last_heartbeat in one statement
every tick and right before the reaper judges. The service also stands down
while the event loop or the writer lags (workers_app.service), so the
server's own backlog is never taken for an agent's silence.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from tasks_app import events, lifecycle
from tasks_app.batchsql import atomic, marks, select, table, update_rows
from tasks_app.models import Attempt
from workers_app import delivery, dispatch, protocol, servers
from workers_app.models import Server, Worker

log = logging.getLogger(__name__)

# States a connection coming or going leaves alone: only an admin ends them.
STICKY = (Worker.State.DISABLED, Worker.State.PENDING)

# worker id -> epoch seconds of the last message received from it here.
SEEN: dict[int, float] = {}
_flushed: dict[int, float] = {}


def seen(worker_id: int) -> None:
    SEEN[worker_id] = time.time()


def flush_heartbeats() -> int:
    """Write last_heartbeat of every worker heard from since the last flush."""
    fresh = [(w, t) for w, t in list(SEEN.items()) if _flushed.get(w) != t]
    if not fresh:
        return 0
    update_rows(
        Worker,
        {"last_heartbeat": "%s"},
        [(dt.datetime.fromtimestamp(t, tz=dt.UTC), w) for w, t in fresh],
    )
    _flushed.update(fresh)
    return len(fresh)


@dataclass(frozen=True)
class Hello:
    worker_id: int
    channel_name: str
    frame: dict


@dataclass
class Reconciled:
    """What a hello changed: attempts lost, assignments to send again."""

    worker: Worker
    lost: list[int] = field(default_factory=list)
    resend: list[dict] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)


class WorkerGone(Exception):
    """The worker was deleted or revoked while its agent was connecting."""


def hello_many(hellos: Sequence[Hello]) -> list[Reconciled | WorkerGone]:
    """Bring workers online and reconcile what each says it runs with what we think.

    A handful of statements for any number of hellos (a fleet reconnecting
    after a restart), and no dispatch pass of its own.
    """
    now = timezone.now()
    ids = {h.worker_id for h in hellos}
    with atomic():
        workers = Worker.objects.filter(pk__in=ids, revoked_at__isnull=True)
        if connection.features.has_select_for_update:
            # In id order, as dispatch locks workers: no deadlock between them.
            workers = workers.select_for_update().order_by("pk")
        workers = {w.pk: w for w in workers}
        replaced = []
        for hello in hellos:
            worker = workers.get(hello.worker_id)
            if worker is None:
                continue
            frame = hello.frame
            if worker.channel_name and worker.channel_name != hello.channel_name:
                # Only one connection serves a worker: the older one is closed, so
                # that an attempt can never be handed to two sockets.
                replaced.append((worker.pk, worker.channel_name))
            worker.hostname = (frame.get("hostname") or worker.hostname)[:255]
            worker.agent_version = (frame.get("agent_version") or "")[:50]
            # What it asks for is noted, never taken: labels and capacity are
            # decided on the server (registration.approve), so an agent cannot
            # widen them by saying hello with more.
            worker.requested_capacity = frame["capacity"]
            if "labels" in frame:  # checked by protocol.check
                worker.requested_labels = frame["labels"]
            if worker.state not in (Worker.State.DISABLED, Worker.State.PENDING):
                draining = frame.get("draining") or worker.drain_requested
                worker.state = Worker.State.DRAINING if draining else Worker.State.ONLINE
            worker.channel_name = hello.channel_name
            # Its own credential is back: an admin's consent to re-enroll the
            # name (given for a node that had lost it) is void, or anyone with
            # an enrollment token could take the worker over at its next
            # disconnect.
            worker.reenroll_allowed = False
            worker.server = servers.ME
            worker.last_heartbeat = now
            worker.connected_at = now
        update_rows(
            Worker,
            dict.fromkeys(
                (
                    "hostname",
                    "agent_version",
                    "requested_capacity",
                    "requested_labels",
                    "state",
                    "channel_name",
                    "reenroll_allowed",
                    "server",
                    "last_heartbeat",
                    "connected_at",
                ),
                "%s",
            ),
            [
                (
                    w.hostname,
                    w.agent_version,
                    w.requested_capacity,
                    w.requested_labels,
                    w.state,
                    w.channel_name,
                    w.reenroll_allowed,
                    w.server,
                    w.last_heartbeat,
                    w.connected_at,
                    w.pk,
                )
                for w in workers.values()
            ],
        )
        # Its agent connected (again): state as it is now (online, draining,
        # or still pending or disabled, which a connection does not change).
        events.record_many(
            events.Row(
                events.WORKER_ONLINE, worker_id=w.pk, data={"name": w.name, "state": w.state}
            )
            for w in workers.values()
        )
        active: dict[int, dict[int, tuple]] = {pk: {} for pk in workers}
        for pk, worker_id, status, cancelling in (
            Attempt.objects.filter(worker_id__in=list(workers), status__in=Attempt.ACTIVE)
            .order_by()
            .values_list("pk", "worker_id", "status", "run__cancel_requested_at")
        ):
            active[worker_id][pk] = (status, cancelling)
        lost: dict[int, list[int]] = {}
        for hello in hellos:
            if hello.worker_id not in workers:
                continue
            keep = set(hello.frame["running"]) | set(hello.frame.get("spooled", []))
            # An attempt we think is running there but the agent neither runs nor
            # holds a result for has died with a previous agent process: say so
            # now, not after a timeout.
            lost[hello.worker_id] = [
                pk
                for pk, (status, _) in active[hello.worker_id].items()
                if pk not in keep and status != Attempt.Status.ASSIGNED
            ]
        lifecycle.lose(
            [pk for ids_ in lost.values() for pk in ids_],
            "worker lost: the agent reconnected without it",
        )
        resend = dispatch.assigned_frames(list(workers))
        # Their slots count from now on: a pass for them (not over every worker).
        dispatch.board.mark(workers)
        transaction.on_commit(lambda: dispatch.wake(()), robust=True)
        for worker_id, channel in replaced:
            transaction.on_commit(
                lambda w=worker_id, c=channel: delivery.send_close(w, c, protocol.CLOSE_REPLACED),
                robust=True,
            )
    results: list[Reconciled | WorkerGone] = []
    for hello in hellos:
        worker = workers.get(hello.worker_id)
        if worker is None:
            results.append(WorkerGone(f"worker {hello.worker_id} was deleted or revoked"))
            continue
        running = set(hello.frame["running"])
        gone = set(lost[worker.pk])
        still = {pk: row for pk, row in active[worker.pk].items() if pk not in gone}
        # Runs there that are over for us (declared lost and retried, cancelled,
        # never its own), or whose run is being cancelled: a zombie must not
        # overlap the retry, so stop it.
        cancel = sorted((running - set(still)) | {pk for pk, (_, c) in still.items() if c})
        # Assigned but never started: the assign frame may have been lost with
        # the previous socket, so send it again (the agent ignores duplicates).
        again = [
            f
            for f in resend.get(worker.pk, [])
            if f["attempt"] not in running and f["attempt"] not in cancel
        ]
        results.append(Reconciled(worker=worker, lost=lost[worker.pk], resend=again, cancel=cancel))
    return results


def hello(worker_id: int, channel_name: str, frame: dict) -> Reconciled:
    [result] = hello_many([Hello(worker_id, channel_name, frame)])
    if isinstance(result, WorkerGone):
        raise result
    return result


def agent_draining(worker_ids: Sequence[int]) -> None:
    """The agents say they are shutting down: no new work for them."""
    ids = list(worker_ids)
    if not ids:
        return
    # Only an online one moves, and says so (RETURNING: no read per worker).
    moved = select(
        f"UPDATE {table(Worker)} SET state = %s WHERE id IN ({marks(ids)}) AND state = %s"
        " RETURNING id, name",
        [Worker.State.DRAINING, *ids, Worker.State.ONLINE],
    )
    events.record_many(
        events.Row(events.WORKER_DRAINING, worker_id=pk, data={"name": name, "by": "its agent"})
        for pk, name in sorted(moved)
    )
    dispatch.board.mark(worker_ids)


def apply_state(worker: Worker, state: str) -> None:
    """Drain, resume, disable or enable a worker (dashboard or API), and tell its agent.

    Draining and disabled workers get no new work; what they run finishes.
    """
    with atomic():
        workers = Worker.objects.filter(pk=worker.pk)
        # Read under the row's lock: which change this is (enable or resume).
        old = (
            Worker.objects.select_for_update().filter(pk=worker.pk).values_list("state", flat=True)
        ).first()
        if state == Worker.State.DRAINING:
            workers.update(drain_requested=True)
            workers.filter(state=Worker.State.ONLINE).update(state=state)
            frame = protocol.drain()
        elif state == Worker.State.DISABLED:
            workers.update(state=state)
            frame = protocol.drain()
        elif state == Worker.State.ONLINE:
            # Online if its socket is up, else offline until it says hello.
            workers.update(drain_requested=False)
            # Enabling is not approving: one never approved goes back to pending.
            workers.filter(approved_at__isnull=True).update(state=Worker.State.PENDING)
            live = workers.filter(revoked_at__isnull=True, approved_at__isnull=False)
            live.exclude(channel_name="").update(state=Worker.State.ONLINE)
            live.filter(channel_name="").update(state=Worker.State.OFFLINE)
            frame = protocol.resume()
        else:
            raise ValueError(f"cannot set a worker to {state!r}")
        if old is not None:
            events.record(
                _STATE_EVENTS[state, old == Worker.State.DISABLED],
                worker_id=worker.pk,
                name=worker.name,
            )
        transaction.on_commit(lambda: dispatch.board.mark([worker.pk]), robust=True)
        transaction.on_commit(lambda: delivery.send_frames([(worker.pk, frame)]), robust=True)
        if state == Worker.State.ONLINE:
            transaction.on_commit(dispatch.wake, robust=True)


# (state asked for, whether it was disabled) -> the event of an operator's change.
_STATE_EVENTS = {
    (Worker.State.DRAINING, False): events.WORKER_DRAINING,
    (Worker.State.DRAINING, True): events.WORKER_DRAINING,
    (Worker.State.DISABLED, False): events.WORKER_DISABLED,
    (Worker.State.DISABLED, True): events.WORKER_DISABLED,
    (Worker.State.ONLINE, False): events.WORKER_ACTIVE,
    (Worker.State.ONLINE, True): events.WORKER_ENABLED,
}


def disconnected_many(sockets: Sequence[tuple[int, str]]) -> None:
    """These (worker, channel) sockets closed. Their attempts stay running: the
    agents may come back in time."""
    # One statement for all of them, which says what it moved (for the
    # events). Race: a newer connection of the same agent may already have
    # said hello; only the socket that still owns the worker may take it
    # offline (a channel name belongs to one socket of one worker, so the
    # pairs are matched as two lists). A disabled worker stays disabled; an
    # operator's drain is kept in drain_requested and restored by the next hello.
    if not sockets:
        return
    ids, channels = sorted({w for w, _ in sockets}), sorted({c for _, c in sockets if c})
    moved = channels and select(
        f"UPDATE {table(Worker)} SET channel_name = '', server = '',"
        " state = CASE WHEN state IN (%s, %s) THEN state ELSE %s END"
        f" WHERE id IN ({marks(ids)}) AND channel_name IN ({marks(channels)})"
        " RETURNING id, name, state",
        [*STICKY, Worker.State.OFFLINE, *ids, *channels],
    )
    events.record_many(
        events.Row(
            events.WORKER_OFFLINE,
            worker_id=pk,
            data={"name": name, "state": state, "reason": "disconnected"},
        )
        for pk, name, state in sorted(moved or [])
    )
    dispatch.board.mark(w for w, _ in sockets)


def reap_lost(now: dt.datetime | None = None) -> list[int]:
    """Workers silent for longer than SCHEDULER_LOST_AFTER_S: offline, attempts lost.

    A few statements for any number of them. Every server process runs this
    (workers_app.service): a worker reaped by two at once has its attempts
    lost once, as lose() moves only rows still active.
    """
    flush_heartbeats()
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.SCHEDULER_LOST_AFTER_S)
    # A worker that never heartbeated counts from when it connected or was created.
    silent = Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)
    has_work = (
        Q(state__in=[Worker.State.ONLINE, Worker.State.DRAINING])
        | Q(attempts__status__in=Attempt.ACTIVE)
        # A silent agent waiting for approval: its socket is closed all the same.
        | (Q(state=Worker.State.PENDING) & ~Q(channel_name=""))
    )
    # A worker connected to another server that is alive is that server's to
    # judge: only it knows what it heard and whether it fell behind (a server
    # that lags flushes late, and its agents would look silent to us while
    # their commands run on). Ours, unconnected ones, and those of a server
    # silent for as long (dead, or stalled past any agent's patience) are ours.
    others_alive = set(
        Server.objects.filter(last_seen__gte=cutoff)
        .exclude(name=servers.ME)
        .values_list("name", flat=True)
    )
    candidates = [
        pk
        for pk, server in Worker.objects.filter(silent)
        .filter(has_work)
        .distinct()
        .values_list("pk", "server")
        # Heard from here since: the flush above has written it (no longer silent).
        if SEEN.get(pk, 0) < cutoff.timestamp() and server not in others_alive
    ]
    if not candidates:
        lifecycle.mark_lost(None, "worker lost: the worker was deleted")
        return []
    still_silent = " AND (last_heartbeat < %s OR (last_heartbeat IS NULL AND created_at < %s))"
    at_cutoff = [connection.ops.adapt_datetimefield_value(cutoff)] * 2
    with atomic():
        # Race: a heartbeat landing now (written by this or another server);
        # only workers still silent move, re-checked under the row lock. The
        # ones going offline first, to record that change once (the next
        # statement also returns those offline already, whose attempts may
        # still need losing); the lock held keeps the two statements in step.
        going = select(
            f"UPDATE {table(Worker)} SET state = %s WHERE id IN ({marks(candidates)})"
            f" AND state IN (%s, %s){still_silent} RETURNING id, name",
            [
                Worker.State.OFFLINE,
                *candidates,
                Worker.State.ONLINE,
                Worker.State.DRAINING,
                *at_cutoff,
            ],
        )
        rows = select(
            f"UPDATE {table(Worker)} SET state = CASE WHEN state IN (%s, %s) THEN state ELSE %s END"
            f" WHERE id IN ({marks(candidates)}){still_silent} RETURNING id, channel_name",
            [*STICKY, Worker.State.OFFLINE, *candidates, *at_cutoff],
        )
        reaped = sorted(pk for pk, _ in rows)
        seconds = int(settings.SCHEDULER_LOST_AFTER_S)
        events.record_many(
            events.Row(
                events.WORKER_OFFLINE,
                worker_id=pk,
                data={"name": name, "state": "offline", "reason": f"no heartbeat for {seconds}s"},
            )
            for pk, name in sorted(going)
        )
        declared = lifecycle.lose(
            list(
                Attempt.objects.filter(worker_id__in=reaped, status__in=Attempt.ACTIVE)
                .order_by("pk")
                .values_list("pk", flat=True)
            ),
            f"worker lost: no heartbeat for {seconds}s",
        )
    if reaped:
        # What this server's statements moved (another server reaping at the
        # same moment declares none of these).
        log.warning(
            "workers %s silent for %ss: declared lost: attempts %s", reaped, seconds, declared
        )
    for pk, channel in rows:
        if channel:
            # A socket that is open but silent (a hung agent): close it, so the
            # agent must say hello again and be reconciled.
            delivery.send_close(pk, channel, protocol.CLOSE_SILENT)
    # Active attempts whose worker row is gone (deleted past the signal, e.g.
    # with raw SQL) would otherwise stay running forever.
    lifecycle.mark_lost(None, "worker lost: the worker was deleted")
    dispatch.board.mark(reaped)
    return reaped


def on_worker_deleted(sender, instance: Worker, **kwargs) -> None:
    """A deleted worker reports nothing any more: its attempts are lost now
    (and retried per policy) instead of staying running with no worker; work
    pinned to it fails, since no other worker may take it."""
    lifecycle.mark_lost(instance.pk, "worker lost: the worker was deleted")
    # After mark_lost: the retries it queued for pinned attempts fail too.
    lifecycle.fail_pinned(instance.pk, instance.name)
    dispatch.board.mark([instance.pk])
    delivery.send_close(instance.pk, instance.channel_name, protocol.CLOSE_REVOKED)


def on_worker_saved(sender, instance: Worker, **kwargs) -> None:
    """An edit (the admin's, a registration) may change what dispatch may give it."""
    transaction.on_commit(lambda: dispatch.board.mark([instance.pk]), robust=True)
