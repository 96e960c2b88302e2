"""The agent protocol on the master's side: checking what agents send, building
what we send. The vocabulary (version, frame types and fields, close codes,
streams, labels, sizes) is scheduler_site.wire, which the agent carries too.
Nothing here touches the database.

A run's shards each get an assign with shard_index/shard_count (the count
from the run's snapshot, definition["shards"]); its merge attempt (index =
count) gets null argv and shell plus a `merge` object, see wire.py.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.urls import reverse

from scheduler_site.wire import (
    AGENT_FRAMES,
    CLOSE_BAD_CREDENTIAL,
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_SILENT,
    CLOSE_TRY_AGAIN,
    MAX_CAPACITY,
    MAX_FRAMES_PER_MESSAGE,
    MAX_LOG_DATA,
    MIN_CAPACITY,
    PROTOCOL_VERSION,
    RESULT_STATUSES,
    STREAMS,
    SUPPORTED_PROTOCOLS,
    field_problem,
    pack,
)
from tasks_app import secret_env, shards
from tasks_app.validators import MAX_ID, clean_labels
from workers_app.exceptions import ProtocolError

__all__ = [
    "CLOSE_BAD_CREDENTIAL",
    "CLOSE_REPLACED",
    "CLOSE_REVOKED",
    "CLOSE_SILENT",
    "CLOSE_TRY_AGAIN",
    "PROTOCOL_VERSION",
]

MAX_INT32 = 2**31 - 1
# Epoch seconds from the agent: 2000-01-01 .. 2100-01-01; anything else is a
# broken clock or a broken agent, and would overflow datetime.
MIN_EPOCH, MAX_EPOCH = 946_684_800, 4_102_444_800
INT32_FIELDS = ("seq", "exit_code", "pid", "last_seq")
EPOCH_FIELDS = ("started_at", "finished_at")


def parse_message(text: str | None, max_bytes: int) -> tuple[list[dict], list[dict]]:
    """One websocket message: its checked frames in order, and an error frame
    for each frame refused (the others are still handled)."""
    try:
        decoded = _decode(text, max_bytes)
    except ProtocolError as exc:
        return [], [error(exc.code, exc.message)]
    if not isinstance(decoded, list):
        decoded = [decoded]
    elif not decoded or len(decoded) > MAX_FRAMES_PER_MESSAGE:
        message = f"a message carries 1 to {MAX_FRAMES_PER_MESSAGE} frames, not {len(decoded)}"
        return [], [error("malformed", message)]
    frames, errors = [], []
    for item in decoded:
        try:
            frames.append(check(item))
        except ProtocolError as exc:
            errors.append(error(exc.code, exc.message))
    return frames, errors


def _decode(text: str | None, max_bytes: int) -> Any:
    if text is None:
        raise ProtocolError(
            "binary_frame", "binary frames are not part of the protocol; send JSON text"
        )
    # Cheap check first; encode only when multibyte text could be over the limit.
    size = len(text) if len(text) * 4 <= max_bytes else len(text.encode())
    if size > max_bytes:
        raise ProtocolError("too_large", f"frame of {size} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ProtocolError("malformed", f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed", "frame is nested too deeply") from None


def check(frame: Any) -> dict[str, Any]:
    """A decoded frame, checked against the vocabulary and our ranges."""
    problem = field_problem(frame, AGENT_FRAMES)
    if problem:
        raise ProtocolError(*problem)
    kind = frame["type"]
    _check_fields(kind, frame)
    _check_ranges(kind, frame)
    return frame


def _check_ranges(kind: str, frame: dict[str, Any]) -> None:
    # Only the fields of this kind, whose types field_problem checked: a field
    # of another kind is ignored as any unknown field is, and its value could be
    # anything (an "accepted" with "started_at": {} raised TypeError here).
    fields = AGENT_FRAMES[kind]

    def value(field: str):
        return frame.get(field) if field in fields else None

    if value("attempt") is not None and not 1 <= frame["attempt"] <= MAX_ID:
        raise ProtocolError("malformed", f"{kind}: attempt out of range")
    for field in INT32_FIELDS:
        if value(field) is not None and not -MAX_INT32 <= frame[field] <= MAX_INT32:
            raise ProtocolError("malformed", f"{kind}: {field} out of range")
    for field in EPOCH_FIELDS:
        # NaN fails the comparison too.
        if value(field) is not None and not MIN_EPOCH <= frame[field] <= MAX_EPOCH:
            raise ProtocolError("malformed", f"{kind}: {field} is not a plausible time")
    for field in ("running", "spooled"):
        if any(not 1 <= a <= MAX_ID for a in value(field) or []):
            raise ProtocolError("malformed", f"{kind}: {field} has an id out of range")
    if value("output_bytes") is not None and not 0 <= frame["output_bytes"] <= MAX_ID:
        raise ProtocolError("malformed", f"{kind}: output_bytes out of range")


def _check_fields(kind: str, frame: dict[str, Any]) -> None:
    if kind == "hello":
        if frame["protocol"] not in SUPPORTED_PROTOCOLS:
            supported = " and ".join(str(v) for v in SUPPORTED_PROTOCOLS)
            raise ProtocolError(
                "unsupported_protocol",
                f"protocol {frame['protocol']} is not supported; this master speaks {supported}",
            )
        if not MIN_CAPACITY <= frame["capacity"] <= MAX_CAPACITY:
            raise ProtocolError(
                "malformed", f"hello: capacity must be between {MIN_CAPACITY} and {MAX_CAPACITY}"
            )
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


# --- what we send --------------------------------------------------------------


def encode(frames: list[dict[str, Any]], protocol: int, max_bytes: int) -> list[str]:
    """Websocket messages carrying these frames in order (see wire.pack)."""
    texts = [json.dumps(frame, ensure_ascii=False, separators=(",", ":")) for frame in frames]
    return [text for text, _ in pack(texts, protocol, max_bytes)]


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def welcome(
    worker,
    *,
    protocol: int,
    heartbeat_s: float,
    log_limit_bytes: int,
    max_frame_bytes: int,
    lost_after_s: float,
    self_fence: bool,
) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": protocol,
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


def drain() -> dict[str, Any]:
    return {"type": "drain"}


def resume() -> dict[str, Any]:
    return {"type": "resume"}


def assign(
    attempt_id: int, run_id: int, task_name: str, definition: dict, shard_index: int = 0
) -> dict[str, Any]:
    """The assign frame of one attempt: a shard of its run, or its merge."""
    frame = {
        "type": "assign",
        "attempt": attempt_id,
        "run": run_id,
        "task_name": task_name,
        "argv": None if definition["shell"] else definition["argv"],
        "shell": definition["command"] if definition["shell"] else None,
        "env": definition["env"],
        "cwd": definition["working_dir"] or None,
        "timeout": definition["timeout"],
        "shard_index": shard_index,
        "shard_count": shards.shard_count(definition),
    }
    if definition.get("secret_env"):
        # Decrypted here and only here: the frame goes straight to the agent,
        # which needs the values to run the command and masks them in its output.
        frame["secret_env"] = secret_env.decrypt(definition["secret_env"])
    if shards.is_merge(definition, shard_index):
        # See wire.py: an older agent refuses this rather than run the wrong thing.
        frame.update(argv=None, shell=None, merge=merge_command(attempt_id, definition))
    return frame


def merge_command(attempt_id: int, definition: dict) -> dict[str, Any]:
    shell = definition["shell"]
    return {
        "argv": None if shell else definition["merge_argv"],
        "shell": definition["merge_command"] if shell else None,
        "outputs": reverse("api:agent-shard-outputs", args=[attempt_id]),
    }
