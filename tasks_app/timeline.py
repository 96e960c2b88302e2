"""A run's timeline: its events as lines people read.

The wording of every event kind lives in `describe`, so the run page, and
anything else that shows events (a live page appending a line, a
notification), says them the same way. `lines` adds what a line needs
beside its words: its time and how long after the previous line it came.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tasks_app import events as E
from tasks_app.models import Event
from tasks_app.templatetags.sched import exit_text, seconds_text, status_label

# A run page shows at most this many events (a 1,000-shard run has thousands).
MAX_LINES = 500


@dataclass(frozen=True)
class Line:
    id: int
    at: dt.datetime
    kind: str
    text: str
    since: float | None  # seconds after the previous line; None for the first


def _size(count: int) -> str:
    """Output sizes as people say them: '512 bytes', '1.2 KB', '3.4 MB'."""
    if count < 1024:
        return f"{count} byte{'' if count == 1 else 's'}"
    for unit in ("KB", "MB", "GB"):
        count /= 1024
        if count < 1024 or unit == "GB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def _seconds(value: float) -> str:
    """A delay as it was asked for: '4 s', '2.5 s', '1 min 30 s'."""
    if value < 60:
        return f"{value:.1f}".rstrip("0").rstrip(".") + " s"
    return seconds_text(value)


def _ended(data: Mapping) -> str:
    """How an attempt ended: 'finished: exit 0 (1.2 KB of output)', 'lost: ...'."""
    status = data.get("status", "")
    code = data.get("exit_code")
    head = "finished" if status in ("succeeded", "failed") else status_label(status)
    if code is not None:
        text = f"{head}: {'exit ' if code >= 0 else ''}{exit_text(code)}"
    elif data.get("reason") and data["reason"] != head:
        text = f"{head}: {data['reason']}"
    else:
        text = head
    if "output_bytes" in data and data["output_bytes"] is not None:
        size = data["output_bytes"]
        text += f" ({_size(size)} of output)" if size else " (no output)"
    return text


def describe(event: Event) -> str:
    """One event in words: 'assigned to w1', 'started (pid 123)', 'retried as attempt 2 in 4 s'."""
    data, kind = event.data or {}, event.kind
    name = data.get("name", "")
    by = f" by {data['by']}" if data.get("by") else ""
    match kind:
        case E.RUN_QUEUED:
            text = "queued"
            if data.get("retry_of"):
                text += f" as a retry of run #{data['retry_of']}"
            elif data.get("trigger") not in (None, "manual"):
                text += f" ({data['trigger']})"
            if data.get("held"):
                text += ", held by the task's concurrency limit"
            if data.get("run_at"):
                text += f", to start at {data['run_at']}"
            return text
        case E.RUN_STARTED:
            return "run started"
        case E.RUN_FINISHED:
            text = f"run {status_label(data.get('status', 'finished'))}"
            if data.get("duration_s") is not None:
                text += f" after {seconds_text(data['duration_s'])}"
            if data.get("reason"):
                text += f": {data['reason']}"
            return text
        case E.RUN_CANCEL_REQUESTED:
            return f"cancel requested{by}"
        case E.RUN_RETRIED:
            return f"retried as run #{data.get('new_run_id')}"
        case E.ATTEMPT_QUEUED:
            if data.get("merge"):
                return "merge queued"
            text = f"retried as attempt {data.get('try_number')}"
            if data.get("delay_s"):
                text += f" in {_seconds(data['delay_s'])}"
            return text
        case E.ATTEMPT_ASSIGNED:
            return f"assigned to {data.get('worker', 'a worker')}"
        case E.ATTEMPT_ACCEPTED:
            return "accepted"
        case E.ATTEMPT_STARTED:
            return f"started (pid {data['pid']})" if data.get("pid") else "started"
        case E.ATTEMPT_REQUEUED:
            text = f"handed back: {data.get('reason', 'requeued')}"
            if data.get("delay_s"):
                text += f", offered again in {_seconds(data['delay_s'])}"
            return text
        case E.ATTEMPT_FINISHED:
            return _ended(data)
        case E.ATTEMPT_LOST:
            return f"lost: {data['reason']}" if data.get("reason") else "lost"
        case E.ATTEMPT_SUPERSEDED:
            said = status_label(data.get("status", ""))
            code = data.get("exit_code")
            if code is not None:
                said += f", {'exit ' if code >= 0 else ''}{exit_text(code)}"
            return f"late report ignored: the agent said {said}"
        case E.WORKER_ENROLLED:
            return f"worker {name} enrolled{' again' if data.get('again') else ''}"
        case E.WORKER_APPROVED:
            return f"worker {name} approved{by}"
        case E.WORKER_ONLINE:
            state = data.get("state")
            return f"worker {name} online" + ("" if state in (None, "online") else f" ({state})")
        case E.WORKER_OFFLINE:
            reason = data.get("reason")
            return f"worker {name} offline" + (f": {reason}" if reason else "")
        case E.WORKER_DRAINING:
            return f"worker {name} draining{by}"
        case E.WORKER_ACTIVE:
            return f"worker {name} resumed"
        case E.WORKER_DISABLED:
            return f"worker {name} disabled"
        case E.WORKER_ENABLED:
            return f"worker {name} enabled"
        case E.WORKER_REVOKED:
            return f"worker {name} revoked"
        case E.TASK_CREATED:
            return f"task {name} created"
        case E.TASK_CHANGED:
            return f"task {name} changed"
        case E.TASK_DELETED:
            return f"task {name} deleted"
        case E.SCHEDULER_PAUSED:
            return f"scheduler paused{by}"
        case E.SCHEDULER_RESUMED:
            return f"scheduler resumed{by}"
    return kind  # a kind newer than this function: its name, rather than nothing


def lines(rows: Iterable[Event], shards: Mapping[int, str] | None = None) -> list[Line]:
    """Events as timeline lines, in order. shards: attempt id -> a prefix
    ('shard 3') for runs of several shards, so their lines tell apart."""
    result: list[Line] = []
    previous = None
    for event in rows:
        text = describe(event)
        if shards and event.attempt_id in shards:
            text = f"{shards[event.attempt_id]}: {text}"
        since = None if previous is None else max((event.at - previous).total_seconds(), 0.0)
        result.append(Line(event.id, event.at, event.kind, text, since))
        previous = event.at
    return result


def of_run(run_id: int, shards: Mapping[int, str] | None = None) -> tuple[list[Line], bool]:
    """The run's timeline (one query, on the run's index) and whether it was cut
    at MAX_LINES."""
    rows = list(Event.objects.filter(run_id=run_id).order_by("id")[: MAX_LINES + 1])
    return lines(rows[:MAX_LINES], shards), len(rows) > MAX_LINES
