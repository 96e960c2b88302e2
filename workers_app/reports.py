"""Applying what agents report, many messages from many agents at once.

The writer hands over every agent message that accumulated; each frame type
is applied for all of them together (accepted, rejected, started, output,
finished, in the order an attempt goes through them), and each message gets
back the frames that answer it: acks, log acks, errors, cancels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.db import transaction

from tasks_app import lifecycle, logs
from tasks_app.lifecycle import Finished, Outcome, Result, Started
from workers_app import dispatch, protocol

# A rejected assignment is offered again after this long at the earliest.
REJECT_BACKOFF_S = 1.0


@dataclass(frozen=True)
class Message:
    worker_id: int
    frames: list[dict]


def _unknown(attempt_id: int, message: str = "no such attempt is assigned to you") -> dict:
    return protocol.error("unknown_attempt", message, attempt=attempt_id)


def apply_messages(messages: Sequence[Message]) -> list[list[dict]]:
    """Apply a batch of agent messages; the reply frames for each, in order."""
    replies: list[list[dict]] = [[] for _ in messages]
    by_type: dict[str, list[tuple[int, int, dict]]] = {}
    for index, message in enumerate(messages):
        for frame in message.frames:
            by_type.setdefault(frame["type"], []).append((index, message.worker_id, frame))
    freed: dict[int, int] = {}  # worker -> slots that came free

    # A start says "accepted" too (an agent sends both at once for a short
    # command): only accepts without their start in this batch need a write.
    starting = {(w, f["attempt"]) for _, w, f in by_type.get("started", [])}
    accepted = [a for a in by_type.get("accepted", []) if (a[1], a[2]["attempt"]) not in starting]
    ok = lifecycle.accept_many([(w, f["attempt"]) for _, w, f in accepted])
    for index, worker_id, frame in accepted:
        if (worker_id, frame["attempt"]) not in ok:
            # Re-queued meanwhile (accept timeout) or cancelled: it must not run here.
            replies[index].append(protocol.cancel(frame["attempt"]))

    rejected: dict[int, list[int]] = {}
    for _, worker_id, frame in by_type.get("rejected", []):
        rejected.setdefault(worker_id, []).append(frame["attempt"])
    for worker_id, ids in rejected.items():
        # The agent knows better than our slot count (it is draining, or still
        # runs something we gave up on): back off before it is offered again,
        # or the same assign/reject pair would bounce as fast as the socket allows.
        moved = lifecycle.requeue(worker_id, ids, delay_s=REJECT_BACKOFF_S)
        if moved:
            freed[worker_id] = freed.get(worker_id, 0) + len(moved)

    started = by_type.get("started", [])
    ok = lifecycle.start_many(
        [Started(w, f["attempt"], f.get("started_at"), f.get("pid")) for _, w, f in started]
    )
    for index, worker_id, frame in started:
        if (worker_id, frame["attempt"]) not in ok:
            # Not its attempt (any more: re-queued after the accept timeout,
            # cancelled): say so, and have it stop the process it started.
            replies[index] += [_unknown(frame["attempt"]), protocol.cancel(frame["attempt"])]

    # Every log frame of an attempt comes before its finished frame: stored first.
    output = by_type.get("log", [])
    appended = logs.append_logs(
        [logs.Chunk(w, f["attempt"], f["seq"], f["stream"], f["data"]) for _, w, f in output]
    )
    answered = set()
    for index, worker_id, frame in output:
        key = (worker_id, frame["attempt"])
        if key in answered:
            continue
        answered.add(key)
        if key in appended.refused:
            replies[index].append(
                _unknown(frame["attempt"], "output for an attempt you do not run")
            )
        else:
            # One acknowledgement per attempt per batch: the agent may forget those frames.
            replies[index].append(protocol.log_ack(frame["attempt"], appended.acked[key]))

    finished = by_type.get("finished", [])
    outcomes = lifecycle.finish_many(
        [Finished(w, f["attempt"], _result(f)) for _, w, f in finished]
    )
    for (index, worker_id, frame), outcome in zip(finished, outcomes, strict=True):
        if outcome is Outcome.UNKNOWN:
            replies[index].append(_unknown(frame["attempt"]))
        elif outcome is Outcome.STORED:
            freed[worker_id] = freed.get(worker_id, 0) + 1
        # Acknowledge duplicates, late and unknown ones too, so the agent's spool drains.
        replies[index].append(protocol.ack(frame["attempt"]))

    if freed:
        # Counted once the batch is committed: a batch that fails is applied
        # again job by job, and must not free the same slots twice.
        def free_slots() -> None:
            for worker_id, slots in freed.items():
                dispatch.board.release(worker_id, slots)
            dispatch.wake(())

        transaction.on_commit(free_slots, robust=True)
    return replies


def _result(frame: dict) -> Result:
    return Result(
        status=frame["status"],
        exit_code=frame["exit_code"],
        reason=frame.get("reason", ""),
        started_at=frame.get("started_at"),
        finished_at=frame.get("finished_at"),
        output_bytes=frame.get("output_bytes", 0),
        truncated=frame.get("truncated", False),
    )
