"""The outbox: every state change becomes an Event row in its own transaction.

Call `record` (one) or `record_many` (a batch: one INSERT) from inside the
transaction that makes the change. Nothing is announced before it commits:
an `on_commit` hook merges what the transaction wrote into a process-wide
summary, and the writer's "events" follow-up publishes that summary on the
channel layer's group GROUP, one message for however many transactions
committed meanwhile. Every server's listeners (the browsers' live sockets)
get it through the layer (Redis when scaled out), so a change committed on
one server shows on pages served by another.

A rolled-back transaction leaves no row and announces nothing. The message
says only what changed (kinds and ids), never the state: listeners read the
database, which stays the source of truth, and a listener that missed
messages catches up by reading the rows after the last id it saw.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from django.db import connection, transaction
from django.utils import timezone

from tasks_app import batchsql
from tasks_app.models import Event

# The channel-layer group every live listener joins.
GROUP = "scheduler.events"
# Past this many ids of one kind a message says "many" (None) instead of listing them.
MAX_IDS = 500

# Runs
RUN_QUEUED = "run.queued"
RUN_STARTED = "run.started"
RUN_FINISHED = "run.finished"  # data: status, reason
RUN_CANCEL_REQUESTED = "run.cancel_requested"  # data: by
RUN_RETRIED = "run.retried"  # on the old run; data: new_run_id
# Attempts (run_id, attempt_id, and worker_id once it has one)
ATTEMPT_QUEUED = "attempt.queued"  # a retry inside the run; data: try_number, delay_s
ATTEMPT_ASSIGNED = "attempt.assigned"  # data: worker (name)
ATTEMPT_ACCEPTED = "attempt.accepted"
ATTEMPT_STARTED = "attempt.started"  # data: pid
ATTEMPT_REQUEUED = "attempt.requeued"  # taken back before it started; data: reason
ATTEMPT_FINISHED = "attempt.finished"  # data: status, exit_code, reason, output_bytes
ATTEMPT_LOST = "attempt.lost"  # data: reason
ATTEMPT_SUPERSEDED = "attempt.superseded"  # a late report after the master closed it
# Workers (worker_id; data: name)
WORKER_ENROLLED = "worker.enrolled"
WORKER_APPROVED = "worker.approved"
WORKER_ONLINE = "worker.online"
WORKER_OFFLINE = "worker.offline"
WORKER_DRAINING = "worker.draining"
WORKER_ACTIVE = "worker.active"  # resumed after draining
WORKER_DISABLED = "worker.disabled"
WORKER_ENABLED = "worker.enabled"
WORKER_REVOKED = "worker.revoked"
# Tasks (task_id; data: name)
TASK_CREATED = "task.created"
TASK_CHANGED = "task.changed"
TASK_DELETED = "task.deleted"
# The scheduler switch (data: by)
SCHEDULER_PAUSED = "scheduler.paused"
SCHEDULER_RESUMED = "scheduler.resumed"

KINDS = frozenset(
    value for name, value in list(globals().items()) if name.isupper() and "." in str(value)
) - {GROUP}


class Row(NamedTuple):
    kind: str
    run_id: int | None = None
    attempt_id: int | None = None
    task_id: int | None = None
    worker_id: int | None = None
    data: dict | None = None


FIELDS = ("kind", "run_id", "attempt_id", "task_id", "worker_id", "data", "at")


def record(
    kind: str,
    *,
    run_id: int | None = None,
    attempt_id: int | None = None,
    task_id: int | None = None,
    worker_id: int | None = None,
    **data: Any,
) -> None:
    """Record one state change in the current transaction."""
    record_many([Row(kind, run_id, attempt_id, task_id, worker_id, data)])


def record_many(rows: Iterable[Row | tuple], at=None) -> None:
    """Record state changes, in order, with one INSERT, in the current transaction."""
    rows = [Row(*row) for row in rows]
    if not rows:
        return
    unknown = {row.kind for row in rows} - KINDS
    if unknown:
        raise ValueError(f"unknown event kind(s): {sorted(unknown)}")
    gathering = getattr(_gathered, "batch", None)
    if gathering is not None and at is None:
        marker = None
        if _savepoints() > gathering[0]:
            # Inside a savepoint opened since: if it is rolled back these rows
            # must go with it. Django drops the on-commit hooks registered in
            # a savepoint rolled back; this no-op one tells whether it was.
            marker = _marker()
            transaction.on_commit(marker)
        gathering[1].append((rows, marker))
        return
    _write(rows, at)


@contextlib.contextmanager
def gathered() -> Iterator[None]:
    """Within it, record_many only gathers rows, and leaving it writes them all,
    in the order recorded, with one INSERT, still inside the caller's
    transaction. The writer wraps each batch in it: a batch of triggers,
    starts and results, whose batch functions each record, costs one INSERT
    of events, not one per function. Rows recorded in a savepoint that was
    rolled back are left out; an exception writes nothing."""
    if getattr(_gathered, "batch", None) is not None:
        yield  # nested: the outermost writes
        return
    _gathered.batch = (_savepoints(), [])
    try:
        yield
        chunks = _gathered.batch[1]
    finally:
        _gathered.batch = None
    hooks = {id(hook) for _, hook, *_ in connection.run_on_commit}
    rows = [row for chunk, mark in chunks if mark is None or id(mark) in hooks for row in chunk]
    if rows:
        _write(rows, None)


_gathered = threading.local()


def _savepoints() -> int:
    # An atomic block without a savepoint (batchsql.atomic) is listed as None.
    return sum(1 for sid in connection.savepoint_ids if sid is not None)


def _marker():
    return lambda: None


def _write(rows: list[Row], at) -> None:
    at = at or timezone.now()
    ids = batchsql.insert_rows(Event, FIELDS, [(*row[:5], row.data or {}, at) for row in rows])
    summary = Summary()
    summary.add(rows, max(ids))
    transaction.on_commit(functools.partial(_committed, summary), robust=True)


@dataclass
class Summary:
    """What some committed transactions changed: a group message's body."""

    last_id: int = 0
    kinds: set[str] = field(default_factory=set)
    ids: dict[str, set[int] | None] = field(
        default_factory=lambda: {"runs": set(), "tasks": set(), "workers": set()}
    )

    def add(self, rows: Sequence[Row], last_id: int) -> None:
        self.last_id = max(self.last_id, last_id)
        for row in rows:
            self.kinds.add(row.kind)
            for key, value in (
                ("runs", row.run_id),
                ("tasks", row.task_id),
                ("workers", row.worker_id),
            ):
                self._note(key, value)

    def merge(self, other: Summary) -> None:
        self.last_id = max(self.last_id, other.last_id)
        self.kinds |= other.kinds
        for key, values in other.ids.items():
            if values is None:
                self.ids[key] = None
            else:
                for value in values:
                    self._note(key, value)

    def _note(self, key: str, value: int | None) -> None:
        known = self.ids[key]
        if value is None or known is None:
            return
        known.add(value)
        if len(known) > MAX_IDS:
            self.ids[key] = None

    def message(self) -> dict:
        """The group message: listeners' `events_committed` handlers get it."""
        return {
            "type": "events.committed",
            "last_id": self.last_id,
            "kinds": sorted(self.kinds),
            # None: too many to list, treat every one as changed.
            **{key: None if ids is None else sorted(ids) for key, ids in self.ids.items()},
        }


_lock = threading.Lock()
_pending: Summary | None = None


def _committed(summary: Summary) -> None:
    global _pending
    with _lock:
        if _pending is None:
            _pending = summary
        else:
            _pending.merge(summary)
    from tasks_app.writer import writer

    writer.request("events")


def publish() -> None:
    """The writer's "events" follow-up: announce everything committed since the last one."""
    global _pending
    with _lock:
        summary, _pending = _pending, None
    if summary is None:
        return
    from channels.layers import get_channel_layer

    from tasks_app.writer import writer

    layer = get_channel_layer()
    if layer is None:
        return
    writer.spawn(functools.partial(layer.group_send, GROUP, summary.message()), "an events message")


def after(last_id: int, limit: int = 1000, **filters: Any) -> list[Event]:
    """Events after `last_id`, oldest first: what a listener that saw up to it missed."""
    return list(Event.objects.filter(id__gt=last_id, **filters).order_by("id")[:limit])


def last_id() -> int:
    """The newest event's id (0 for none): where a new listener starts."""
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0
