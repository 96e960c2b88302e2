"""The agent protocol, version 1: JSON text frames, validated on the way in.

parse() turns raw text into a checked dict or raises ProtocolError; the
builders make the master's frames. Nothing here touches the database.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError

from tasks_app.validators import clean_labels
from workers_app.exceptions import ProtocolError

PROTOCOL_VERSION = 1

# Close codes in the private range (RFC 6455 section 7.4.2: 4000-4999).
CLOSE_BAD_CREDENTIAL = 4401
CLOSE_REVOKED = 4403
# A newer connection of the same worker said hello: only one may serve it.
CLOSE_REPLACED = 4409
# Silent for longer than SCHEDULER_LOST_AFTER_S while the socket stayed open.
CLOSE_SILENT = 4408
# RFC 6455 7.4.1: 1013 "try again later" — a transient failure on our side.
CLOSE_TRY_AGAIN = 1013
STREAMS = {"stdout", "stderr"}
# "lost": the agent gave the attempt up (drain timeout, self-fencing); it is retried.
RESULT_STATUSES = {"succeeded", "failed", "timed_out", "cancelled", "lost"}
MAX_LOG_DATA = 512 * 1024

# type -> {field: (python types, required)}
_INT = (int,)
_NUM = (int, float)
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {
        "protocol": (_INT, True),
        "agent_version": ((str,), False),
        "hostname": ((str,), False),
        "name": ((str,), False),
        "capacity": (_INT, True),
        "labels": ((list,), False),
        "running": ((list,), True),
        # Finished while disconnected, result spooled and about to be replayed.
        "spooled": ((list,), False),
        "draining": ((bool,), False),
    },
    "accepted": {"attempt": (_INT, True)},
    "rejected": {"attempt": (_INT, True), "reason": ((str,), False)},
    "started": {
        "attempt": (_INT, True),
        "pid": (_INT + (type(None),), False),
        "started_at": (_NUM, False),
    },
    "log": {
        "attempt": (_INT, True),
        "seq": (_INT, True),
        "stream": ((str,), True),
        "data": ((str,), True),
    },
    "finished": {
        "attempt": (_INT, True),
        "status": ((str,), True),
        "exit_code": (_INT + (type(None),), True),
        "reason": ((str,), False),
        "started_at": (_NUM + (type(None),), False),
        "finished_at": (_NUM + (type(None),), False),
        "output_bytes": (_INT, False),
        "truncated": ((bool,), False),
        "last_seq": (_INT, False),
    },
    "heartbeat": {"running": ((list,), False), "draining": ((bool,), False)},
}


def parse(text: str | None, max_bytes: int) -> dict[str, Any]:
    """A validated frame, or ProtocolError with a code and a message for the agent."""
    if text is None:
        raise ProtocolError(
            "binary_frame", "binary frames are not part of the protocol; send JSON text"
        )
    # Cheap check first; encode only when multibyte text could be over the limit.
    size = len(text) if len(text) * 4 <= max_bytes else len(text.encode())
    if size > max_bytes:
        raise ProtocolError("too_large", f"frame of {size} bytes exceeds the limit of {max_bytes}")
    try:
        frame = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("malformed", f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("malformed", "frame must be a JSON object")
    kind = frame.get("type")
    if kind not in SCHEMAS:
        raise ProtocolError("unknown_type", f"unknown frame type {kind!r}")
    for field, (types, required) in SCHEMAS[kind].items():
        if field not in frame:
            if required:
                raise ProtocolError("malformed", f"{kind}: missing field {field!r}")
            continue
        value = frame[field]
        # bool is an int in Python; a boolean where a number is expected is a bug in the agent.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError("malformed", f"{kind}: field {field!r} has the wrong type")
    _check_values(kind, frame)
    return frame


MAX_ID = 2**63 - 1  # a database bigint
MAX_INT32 = 2**31 - 1
# Epoch seconds from the agent: 2000-01-01 .. 2100-01-01; anything else is a
# broken clock or a broken agent, and would overflow datetime.
MIN_EPOCH, MAX_EPOCH = 946_684_800, 4_102_444_800
ID_FIELDS = ("attempt",)
INT32_FIELDS = ("seq", "exit_code", "pid", "last_seq")
EPOCH_FIELDS = ("started_at", "finished_at")


def _check_ranges(kind: str, frame: dict[str, Any]) -> None:
    for field in ID_FIELDS:
        if field in frame and not 1 <= frame[field] <= MAX_ID:
            raise ProtocolError("malformed", f"{kind}: {field} out of range")
    for field in INT32_FIELDS:
        value = frame.get(field)
        if value is not None and not -MAX_INT32 <= value <= MAX_INT32:
            raise ProtocolError("malformed", f"{kind}: {field} out of range")
    for field in EPOCH_FIELDS:
        value = frame.get(field)
        if value is not None and not MIN_EPOCH <= value <= MAX_EPOCH:  # NaN fails too
            raise ProtocolError("malformed", f"{kind}: {field} is not a plausible time")
    for field in ("running", "spooled"):
        if any(not 1 <= a <= MAX_ID for a in frame.get(field, [])):
            raise ProtocolError("malformed", f"{kind}: {field} has an id out of range")
    if "output_bytes" in frame and not 0 <= frame["output_bytes"] <= MAX_ID:
        raise ProtocolError("malformed", f"{kind}: output_bytes out of range")


def _check_text(kind: str, value: Any) -> None:
    """JSON escapes can smuggle lone surrogates in, which no database stores."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ProtocolError("malformed", f"{kind}: text is not valid Unicode") from None
    elif isinstance(value, list):
        for item in value:
            _check_text(kind, item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(kind, key)
            _check_text(kind, item)


def _check_values(kind: str, frame: dict[str, Any]) -> None:
    _check_fields(kind, frame)
    _check_ranges(kind, frame)
    _check_text(kind, frame)


def _check_fields(kind: str, frame: dict[str, Any]) -> None:
    if kind == "hello":
        if frame["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_protocol",
                f"protocol {frame['protocol']} is not supported; this master speaks 1",
            )
        if not 1 <= frame["capacity"] <= 1024:
            raise ProtocolError("malformed", "hello: capacity must be between 1 and 1024")
        if "labels" in frame:
            try:
                frame["labels"] = clean_labels(frame["labels"])
            except ValidationError as exc:
                raise ProtocolError("malformed", f"hello: {exc.messages[0]}") from None
    for field in ("running", "spooled"):
        if kind in ("hello", "heartbeat") and not all(
            isinstance(a, int) and not isinstance(a, bool) for a in frame.get(field, [])
        ):
            raise ProtocolError("malformed", f"{kind}: {field} must be a list of attempt ids")
    if kind == "log":
        if frame["stream"] not in STREAMS:
            raise ProtocolError("malformed", "log: stream must be stdout or stderr")
        if frame["seq"] < 0:
            raise ProtocolError("malformed", "log: seq must not be negative")
        if len(frame["data"]) > MAX_LOG_DATA:
            raise ProtocolError("too_large", f"log: data over {MAX_LOG_DATA} characters")
    if kind == "finished" and frame["status"] not in RESULT_STATUSES:
        raise ProtocolError("malformed", f"finished: unknown status {frame['status']!r}")


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def welcome(
    worker,
    *,
    heartbeat_s: float,
    log_limit_bytes: int,
    max_frame_bytes: int,
    lost_after_s: float,
    self_fence: bool,
) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": PROTOCOL_VERSION,
        "worker_id": worker.pk,
        "name": worker.name,
        "heartbeat_s": heartbeat_s,
        "log_limit_bytes": log_limit_bytes,
        "max_frame_bytes": max_frame_bytes,
        "lost_after_s": lost_after_s,
        # The agent kills its commands after losing us this long, before we
        # declare them lost and may run a retry elsewhere.
        # It counts from when its socket dropped, which is up to a heartbeat
        # after our last sign of it, hence the margin.
        "fence_after_s": max(lost_after_s - 2 * heartbeat_s, lost_after_s / 2)
        if self_fence
        else None,
    }


def cancel(attempt_id: int) -> dict[str, Any]:
    return {"type": "cancel", "attempt": attempt_id}


def ack(attempt_id: int) -> dict[str, Any]:
    return {"type": "ack", "attempt": attempt_id}


def log_ack(attempt_id: int, seq: int) -> dict[str, Any]:
    return {"type": "log_ack", "attempt": attempt_id, "seq": seq}


def assign(attempt) -> dict[str, Any]:
    definition = attempt.run.definition
    return {
        "type": "assign",
        "attempt": attempt.pk,
        "run": attempt.run_id,
        "task_name": attempt.run.task_name,
        "argv": None if definition["shell"] else definition["argv"],
        "shell": definition["command"] if definition["shell"] else None,
        "env": definition["env"],
        "cwd": definition["working_dir"] or None,
        "timeout": definition["timeout"],
        "shard_index": attempt.shard_index,
        "shard_count": 1,
    }
