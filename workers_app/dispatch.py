"""Matching queued attempts to free slots of online workers.

A board in memory (each online worker's capacity, labels and slots in use,
and the label sets that may have queued work) saves reads; the database
decides. A pass fetches, for each label set that some worker with a free
slot can take, the first ready attempts in queue order (queue_at: ready_at
less the priority's head start, models.queue_at) with one index range scan
LIMITed to those free slots; gives them out in that order, each to a worker
that can take it as its task's strategy says (least loaded, in turn, at
random; pinned work carries its worker's "@<id>" pseudo-label, which only
that worker has); and claims each worker's share with one conditional
UPDATE (only rows still queued move; on PostgreSQL the rows were read with
FOR UPDATE SKIP LOCKED, so two dispatchers never wait on or take the same
rows). A pass therefore costs what the slots it fills cost, whatever the
queue's length, and a pass with no free slot or no queued work, when nothing
changed, costs no query at all.

Failover: an attempt re-queued by its agent, or a retry of one lost or
failed on a worker, names that worker (avoid_worker); it goes to another
worker with a free slot when there is one, and back to the same one only
when there is not.

The board cannot drift for long: a worker whose attempts ended, whose agent
said hello or went away, or whose state an operator changed is marked stale
and recounted from the database (one query for all of them) before the next
pass; the service rebuilds the whole board, and re-reads the queued label
sets, on every tick.

An attempt whose run's secret variables cannot be decrypted (SECRET_KEY
changed without a fallback) can never be given to an agent: it is left out
before the share-out, so it takes no slot, and fails with the reason in the
same pass; the rest of the pass goes on.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from tasks_app import lifecycle, secret_env
from tasks_app.batchsql import atomic, aware, for_update, json_value, marks, select, table
from tasks_app.exceptions import SecretsUnreadable
from tasks_app.models import Attempt, Run, SchedulerState, Strategy, pin_label
from tasks_app.writer import writer
from workers_app import delivery, protocol
from workers_app.models import Worker

log = logging.getLogger(__name__)

ATTEMPT, RUN, WORKER = table(Attempt), table(Run), table(Worker)


@dataclass
class Slots:
    name: str
    capacity: int
    labels: frozenset[str]
    busy: int

    @property
    def free(self) -> int:
        return self.capacity - self.busy

    @property
    def load(self) -> float:
        return self.busy / self.capacity


class Board:
    """What dispatch knows between passes; the database stays the judge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.workers: dict[int, Slots] = {}
        self.classes: set[str] = set()  # labels keys that may have queued attempts
        self.paused = False
        self._stale: set[int] = set()
        self._freed: dict[int, int] = {}
        self._new_classes: set[str] = set()
        self._rebuild = True
        # round_robin: per task name, the worker its last attempt went to. A
        # hint kept across rebuilds, per server process; the claim still decides.
        self.turns: dict[str, int] = {}

    def mark(self, worker_ids: Iterable[int | None]) -> None:
        """Recount these workers before the next pass (their state changed: a
        hello, a disconnect, an operator's drain, attempts lost)."""
        with self._lock:
            self._stale.update(w for w in worker_ids if w)

    def release(self, worker_id: int, slots: int) -> None:
        """That many of the worker's attempts ended (results stored, assignments
        handed back): its slots are free again without a recount."""
        with self._lock:
            self._freed[worker_id] = self._freed.get(worker_id, 0) + slots

    def add_classes(self, keys: Iterable[str] | None) -> None:
        """Attempts of these label sets were queued (None: re-read them all)."""
        with self._lock:
            if keys is None:
                self._rebuild = True
            else:
                self._new_classes.update(keys)

    def idle(self) -> bool:
        """Nothing to do: nothing changed since the last pass, and no worker has a
        free slot or no label set has queued work."""
        with self._lock:
            if self._rebuild or self._stale or self._freed or self._new_classes:
                return False
        return not self.classes or not any(s.free > 0 for s in self.workers.values())

    def invalidate(self) -> None:
        with self._lock:
            self._rebuild = True

    def refresh(self) -> None:
        """Bring the board up to date with the database (in a transaction)."""
        with self._lock:
            rebuild, self._rebuild = self._rebuild, False
            stale, self._stale = self._stale, set()
            freed, self._freed = self._freed, {}
            self.classes |= self._new_classes
            self._new_classes = set()
        if rebuild:
            self.paused = SchedulerState.is_paused()
            self.workers = {}
            self.classes = _queued_classes()
            _load(self.workers, Worker.objects.all())
            return
        for worker_id, slots in freed.items():
            if worker_id in self.workers and worker_id not in stale:
                slots_of = self.workers[worker_id]
                slots_of.busy = max(slots_of.busy - slots, 0)
        if stale:
            for worker_id in stale:
                self.workers.pop(worker_id, None)
            _load(self.workers, Worker.objects.filter(pk__in=stale))


def _load(into: dict[int, Slots], workers) -> None:
    # Pending (not approved) workers are never online, so never eligible;
    # lifecycle.claim re-checks the state under the row lock.
    eligible = workers.filter(
        state=Worker.State.ONLINE, revoked_at__isnull=True, approved_at__isnull=False
    )
    for worker in eligible.with_busy_slots().only(
        "pk", "name", "capacity", "requested_capacity", "labels"
    ):
        # Its own pseudo-label: attempts pinned to it (tasks_app.routing) match it alone.
        labels = frozenset(worker.labels) | {pin_label(worker.pk)}
        into[worker.pk] = Slots(worker.name, worker.slots, labels, worker.busy)


def _queued_classes() -> set[str]:
    """Distinct labels keys of queued attempts, by a loose index scan of the
    queue index: one probe per label set, however many attempts wait."""
    sql = f"""
        WITH RECURSIVE k(key) AS (
            SELECT MIN(labels_key) FROM {ATTEMPT} WHERE status = %s
            UNION ALL
            SELECT (SELECT MIN(labels_key) FROM {ATTEMPT} WHERE status = %s AND labels_key > k.key)
            FROM k WHERE k.key IS NOT NULL
        )
        SELECT key FROM k WHERE key IS NOT NULL
    """
    return {key for (key,) in select(sql, [Attempt.Status.QUEUED] * 2)}


board = Board()


def dispatch(*, fresh: bool = True) -> list[tuple[int, int]]:
    """One pass: assign as many queued attempts as there are matching free slots.

    fresh: re-read the whole board from the database first (the service's
    backstop, and any caller outside the hot path); the writer's passes only
    recount what changed. Returns (worker id, attempt id) pairs; the assign
    frames go out after commit.
    """
    if fresh:
        board.invalidate()
    elif board.idle():
        return []
    with atomic():
        board.refresh()
        if board.paused:
            return []
        free = {pk: slots for pk, slots in board.workers.items() if slots.free > 0}
        if not free or not board.classes:
            return []
        now = timezone.now()
        candidates, unstartable = _startable(_candidates(free, now))
        shares = _share_out(free, candidates)
        claimed = []
        if shares:
            # Oldest first, whichever worker took it.
            position = {row[1]: index for index, row in enumerate(candidates)}
            claimed = sorted(_claim(shares, now), key=lambda c: position[c[1]])
            frames = _assign_frames(claimed)
            transaction.on_commit(lambda: delivery.send_frames(frames), robust=True)
        if unstartable:
            # After the claim: its runs are locked after the workers, as requeue()
            # in _assign_frames does. Their places in the queue are free now.
            lifecycle.fail_unstartable(unstartable, secret_env.UNREADABLE)
            transaction.on_commit(lambda: wake(()), robust=True)
    return [(worker_id, attempt_id) for worker_id, attempt_id, *_ in claimed]


def _startable(candidates: list[tuple]) -> tuple[list[tuple], list[int]]:
    """The candidates whose assign frame can be built, and the ids of those
    whose run's secrets cannot be decrypted (another SECRET_KEY). A run being
    cancelled is left in: it is claimed and cancelled, never assigned."""
    readable: dict[str, bool] = {}
    kept, unstartable = [], []
    for row in candidates:
        token, cancelling = row[5].get("secret_env") or "", row[6]
        if token and not cancelling:
            if token not in readable:
                readable[token] = secret_env.readable(token)
            if not readable[token]:
                unstartable.append(row[1])
                continue
        kept.append(row)
    return kept, unstartable


def _candidates(free: dict[int, Slots], now) -> list[tuple]:
    """(queue_at, attempt id, run id, shard, task name, definition, cancelling,
    wanted labels, worker to avoid) of the first ready attempts in queue
    order, as many per label set as the workers that can take it have free
    slots.

    The index range is bounded by queue_at <= now, which every ready row
    meets (a priority is never negative), so rows held by a concurrency limit
    or delayed far ahead are never read; ready_at <= now then drops the few
    that are not ready yet but have a head start (delayed by less than their
    priority is worth).
    """
    found = []
    at = connection.ops.adapt_datetimefield_value(now)
    for key in list(board.classes):
        wanted = frozenset(key.split(",")) if key else frozenset()
        room = sum(slots.free for slots in free.values() if wanted <= slots.labels)
        if not room:
            continue
        rows = [
            (aware(queued), pk, run_id, shard, name, json_value(definition), cancelling, avoid)
            for queued, pk, run_id, shard, name, definition, cancelling, avoid in select(
                "SELECT a.queue_at, a.id, a.run_id, a.shard_index, r.task_name, r.definition,"
                # Stopping: the run is being cancelled or is over already (a
                # shard failed for good); the attempt is claimed, then cancelled.
                f" (r.cancel_requested_at IS NOT NULL OR r.status IN ({marks(Run.FINAL)})),"
                f" a.avoid_worker FROM {ATTEMPT} a JOIN {RUN} r ON r.id = a.run_id"
                " WHERE a.status = %s AND a.labels_key = %s AND a.queue_at <= %s"
                " AND a.ready_at <= %s"
                " ORDER BY a.queue_at, a.id LIMIT %s" + for_update(of="a", skip_locked=True),
                # Another server dispatching at the same time skips what we hold.
                [*Run.FINAL, Attempt.Status.QUEUED, key, at, at, room],
            )
        ]
        if len(rows) < room:
            # Nothing more is ready in this label set; triggers and the service's
            # re-read (for retries whose backoff ends) bring it back.
            board.classes.discard(key)
        found += [(*row[:-1], wanted, row[-1]) for row in rows]
    found.sort(key=lambda row: (row[0], row[1]))
    return found


def _share_out(free: dict[int, Slots], candidates: list[tuple]) -> dict[int, list[tuple]]:
    """In queue order, each to a worker that has its labels, chosen by its
    task's strategy; what finds no worker with a free slot waits for the next pass."""
    heaps: dict[frozenset, list] = {}
    members: dict[frozenset, list[int]] = {}
    shares: dict[int, list[tuple]] = {}
    for _, attempt_id, *run, wanted, avoid in candidates:
        task_name, definition = run[2], run[3]
        if wanted not in members:
            members[wanted] = sorted(pk for pk, s in free.items() if wanted <= s.labels)
        strategy = definition.get("strategy") or Strategy.LEAST_LOADED
        if strategy == Strategy.ROUND_ROBIN:
            worker_id = _in_turn(members[wanted], free, avoid, task_name)
        elif strategy == Strategy.RANDOM:
            worker_id = _at_random(members[wanted], free, avoid)
        else:
            # least_loaded; pinned and broadcast have one member, any rule picks it.
            heap = heaps.get(wanted)
            if heap is None:
                heap = heaps[wanted] = [(free[pk].load, pk) for pk in members[wanted]]
                heapq.heapify(heap)
            worker_id = _least_loaded(heap, free, avoid)
        if worker_id is None:
            continue
        free[worker_id].busy += 1
        shares.setdefault(worker_id, []).append((attempt_id, *run))
    return shares


def _settle(heap: list, free: dict[int, Slots]) -> None:
    """Drop full workers off the heap's top and refresh stale loads (another
    label set or strategy took a slot meanwhile), until the top is true."""
    while heap:
        load, worker_id = heap[0]
        slots = free[worker_id]
        if slots.free <= 0:
            heapq.heappop(heap)
        elif load != slots.load:
            heapq.heapreplace(heap, (slots.load, worker_id))
        else:
            break


def _least_loaded(heap: list, free: dict[int, Slots], avoid: int | None) -> int | None:
    """The least-loaded worker (by share of its capacity) with a free slot, not
    `avoid` unless it is the only one."""
    _settle(heap, free)
    if not heap:
        return None
    best = heap[0][1]
    if best != avoid:
        return best
    # Failover: the next best, if anyone else has a free slot.
    top = heapq.heappop(heap)
    _settle(heap, free)
    other = heap[0][1] if heap else None
    heapq.heappush(heap, top)
    return best if other is None else other


def _open(members: list[int], free: dict[int, Slots], avoid: int | None) -> list[int]:
    """Members with a free slot, without `avoid` unless it is the only one."""
    open_ = [pk for pk in members if free[pk].free > 0]
    others = [pk for pk in open_ if pk != avoid]
    return others or open_


def _in_turn(
    members: list[int], free: dict[int, Slots], avoid: int | None, task_name: str
) -> int | None:
    """round_robin: the first worker with a free slot after the one the task's
    last attempt went to, in id order, wrapping around."""
    open_ = _open(members, free, avoid)
    if not open_:
        return None
    last = board.turns.get(task_name, 0)
    worker_id = next((pk for pk in open_ if pk > last), open_[0])
    board.turns[task_name] = worker_id
    return worker_id


def _at_random(members: list[int], free: dict[int, Slots], avoid: int | None) -> int | None:
    open_ = _open(members, free, avoid)
    return random.choice(open_) if open_ else None


def _claim(shares: dict[int, list[tuple]], now) -> list[tuple]:
    """One conditional statement for every share; (worker, attempt, run...) of
    what we got. The database counts each worker's slots as it claims."""
    if connection.features.has_select_for_update:
        # Two server processes claiming for one worker wait for each other here,
        # so that each counts the other's claims.
        ids = sorted(shares)
        # In id order, so that two claimers never each hold a row the other waits for.
        select(f"SELECT id FROM {WORKER} WHERE id IN ({marks(ids)}) ORDER BY id FOR UPDATE", ids)
    claims = [
        lifecycle.Claim(
            worker_id,
            board.workers[worker_id].name,
            row[0],
            board.workers[worker_id].capacity,
            run_id=row[1],
        )
        for worker_id, share in shares.items()
        for row in share
    ]
    # Only to workers still online as the database says now: another server may
    # have reaped, drained or revoked one since our board read it.
    moved = lifecycle.claim(claims, now, worker_state=Worker.State.ONLINE)
    if moved != len(claims):
        # Someone else took some (another server process): see which, and
        # recount those workers before the next pass.
        ours = set(
            Attempt.objects.filter(
                pk__in=[c.attempt_id for c in claims],
                status=Attempt.Status.ASSIGNED,
                assigned_at=now,
            ).values_list("worker_id", "pk")
        )
        for worker_id, share in shares.items():
            kept = [row for row in share if (worker_id, row[0]) in ours]
            if len(kept) != len(share):
                board.mark([worker_id])
            shares[worker_id] = kept
    return [(worker_id, *row) for worker_id, share in shares.items() for row in share]


def _assign_frames(claimed: list[tuple]) -> list[tuple[int, dict]]:
    frames, cancelled = [], {}
    for worker_id, attempt_id, run_id, shard_index, task_name, definition, cancelling in claimed:
        if cancelling:
            # Race: cancelled (or its run failed) between trigger and claim; it
            # must never start. requeue() cancels it.
            cancelled.setdefault(worker_id, []).append(attempt_id)
            continue
        frame = protocol.assign(attempt_id, run_id, task_name, definition, shard_index)
        frames.append((worker_id, frame))
    for worker_id, ids in cancelled.items():
        lifecycle.requeue(worker_id, ids)
        board.mark([worker_id])
    return frames


def assigned_frames(worker_ids: list[int]) -> dict[int, list[dict]]:
    """Assign frames, per worker, of every attempt assigned to it but not started.

    One whose run's secrets cannot be decrypted now (SECRET_KEY changed since
    it was claimed) fails instead, in the caller's transaction."""
    frames: dict[int, list[dict]] = {}
    unstartable = []
    rows = (
        Attempt.objects.filter(worker_id__in=worker_ids, status=Attempt.Status.ASSIGNED)
        .order_by("id")
        .values_list(
            "worker_id", "pk", "run_id", "shard_index", "run__task_name", "run__definition"
        )
    )
    for worker_id, pk, run_id, shard_index, task_name, definition in rows:
        try:
            frame = protocol.assign(pk, run_id, task_name, definition, shard_index)
        except SecretsUnreadable:
            unstartable.append(pk)
            continue
        frames.setdefault(worker_id, []).append(frame)
    lifecycle.fail_unstartable(unstartable, secret_env.UNREADABLE)
    return frames


def wake(labels_keys: Iterable[str] | None = None) -> None:
    """Attempts of these label sets were queued: a pass soon, coalesced with others."""
    board.add_classes(labels_keys)
    writer.request("dispatch")


def on_work_queued(sender, labels_keys=None, **kwargs) -> None:
    wake(labels_keys)


def on_stop_requested(sender, attempts: list[tuple[int, int]], **kwargs) -> None:
    """Send cancel frames to the agents running these attempts."""
    frames = [(worker_id, protocol.cancel(pk)) for worker_id, pk in attempts if worker_id]
    try:
        delivery.send_frames(frames)
    except Exception:
        # The agent's next hello (or the timeout backstop) catches up; the
        # cancel itself is recorded in the database already.
        log.exception("sending cancel frames failed")


def run_pass() -> None:
    """The writer's "dispatch" follow-up: the board is kept current by events."""
    dispatch(fresh=False)
