"""Output of attempts: stored in appended chunks, capped, read back in order."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from tasks_app import secret_env
from tasks_app.batchsql import atomic, update_rows
from tasks_app.exceptions import SecretsUnreadable
from tasks_app.models import Attempt, LogChunk

# What a NUL character in output becomes on PostgreSQL, whose text cannot hold
# one: the character the agent already shows for bytes that are not UTF-8.
# SQLite keeps NUL as printed.
NUL_REPLACEMENT = "\ufffd"
# Rows per fetch when output is read back a piece at a time.
CHUNKS_PER_READ = 200

# The channel-layer group of the sockets of open run pages: after a batch of
# output commits, one `output.stored` message names the runs it was for (None:
# too many to list), and each page of one of them reads its new lines.
OUTPUT_GROUP = "scheduler.output"
MAX_RUN_IDS = 500


@dataclass(frozen=True)
class Chunk:
    worker_id: int
    attempt_id: int
    seq: int
    stream: str
    data: str


@dataclass(frozen=True)
class Appended:
    """What a batch of chunks did: highest seq now stored (or skipped) per
    (worker, attempt), and the (worker, attempt) pairs refused."""

    acked: dict[tuple[int, int], int]
    refused: set[tuple[int, int]]


def append_logs(chunks: Sequence[Chunk]) -> Appended:
    """Store chunks of any number of workers and attempts in a handful of queries.

    Output beyond SCHEDULER_LOG_LIMIT_BYTES per attempt is dropped and the
    attempt marked truncated. Chunks for attempts that are not their worker's
    active ones are refused and change nothing; a chunk stored before (a
    replay after a reconnect) is acknowledged again and not stored twice.
    """
    if not chunks:
        return Appended({}, set())
    ids = {c.attempt_id for c in chunks}
    with atomic():
        owners = {}
        run_of: dict[int, int] = {}
        masks: dict[int, list[str]] = {}
        for pk, worker_id, stored, token, run_id in (
            Attempt.objects.filter(pk__in=ids, status__in=Attempt.ACTIVE)
            .order_by()
            .values_list("pk", "worker_id", "stored_bytes", "run__definition__secret_env", "run_id")
        ):
            owners[pk] = (worker_id, stored)
            run_of[pk] = run_id
            if token:
                masks[pk] = _secret_values(token)
        known = set(
            LogChunk.objects.filter(attempt_id__in=list(owners), seq__in={c.seq for c in chunks})
            .order_by()
            .values_list("attempt_id", "seq")
        )
        limit = settings.SCHEDULER_LOG_LIMIT_BYTES
        stored = {pk: size for pk, (_, size) in owners.items()}
        rows: list[LogChunk] = []
        acked: dict[tuple[int, int], int] = {}
        refused: set[tuple[int, int]] = set()
        truncated: set[int] = set()
        for chunk in sorted(chunks, key=lambda c: (c.attempt_id, c.seq)):
            key = (chunk.worker_id, chunk.attempt_id)
            owner = owners.get(chunk.attempt_id)
            if owner is None or owner[0] != chunk.worker_id:
                refused.add(key)
                continue
            acked[key] = max(acked.get(key, -1), chunk.seq)
            if (chunk.attempt_id, chunk.seq) in known:
                continue  # a replay after a reconnect: stored already
            known.add((chunk.attempt_id, chunk.seq))
            data = chunk.data
            if chunk.attempt_id in masks:
                # A backstop: the agent masks before the output leaves its node
                # (and across chunk boundaries, which this cannot see).
                data = secret_env.mask(data, masks[chunk.attempt_id])
            if "\x00" in data and connection.vendor == "postgresql":
                # Else the whole batch fails, and every frame in it with it.
                data = data.replace("\x00", NUL_REPLACEMENT)
            encoded = data.encode()
            room = limit - stored[chunk.attempt_id]
            if len(encoded) > room:
                truncated.add(chunk.attempt_id)
                data = encoded[: max(room, 0)].decode(errors="ignore")
                encoded = data.encode()
                if not data:
                    continue
            stored[chunk.attempt_id] += len(encoded)
            rows.append(
                LogChunk(attempt_id=chunk.attempt_id, seq=chunk.seq, stream=chunk.stream, data=data)
            )
        # The unique (attempt, seq) constraint is the last word on duplicates.
        LogChunk.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        update_rows(
            Attempt,
            {"stored_bytes": "%s"},
            [(size, pk) for pk, size in stored.items() if size != owners[pk][1]],
        )
        if truncated:
            Attempt.objects.filter(pk__in=truncated).update(truncated=True)
        if rows:
            runs = {run_of[row.attempt_id] for row in rows}
            transaction.on_commit(functools.partial(_stored, runs), robust=True)
    return Appended(acked, refused)


# Runs with output committed since the last `output.stored` message; None: too many.
_lock = threading.Lock()
_stored_runs: set[int] | None = set()
_announce = False


def _stored(runs: set[int]) -> None:
    """After a commit that stored output: one message per writer batch, however
    many attempts and chunks it held (the writer's "output" follow-up)."""
    global _stored_runs, _announce
    with _lock:
        if _stored_runs is not None:
            _stored_runs |= runs
            if len(_stored_runs) > MAX_RUN_IDS:
                _stored_runs = None
        _announce = True
    from tasks_app.writer import writer

    writer.request("output")


def publish_stored() -> None:
    """The writer's "output" follow-up: tell open run pages which runs have new lines."""
    global _stored_runs, _announce
    with _lock:
        if not _announce:
            return
        runs, _stored_runs, _announce = _stored_runs, set(), False
    from channels.layers import get_channel_layer

    from tasks_app.writer import writer

    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "output.stored", "runs": None if runs is None else sorted(runs)}
    writer.spawn(functools.partial(layer.group_send, OUTPUT_GROUP, message), "an output message")


def _secret_values(token: str) -> list[str]:
    try:
        return secret_env.maskable(secret_env.decrypt(token).values())
    except SecretsUnreadable:
        # Then the agent was never given them either: nothing to mask.
        return []


def output_of(attempt: Attempt) -> dict[str, str]:
    """stdout, stderr and both interleaved in order, with a marker when truncated."""
    return outputs_of([attempt])[attempt.pk]


def outputs_of(attempts: Sequence[Attempt]) -> dict[int, dict[str, str]]:
    """output_of for many attempts (a run's shards) in one query, by attempt id."""
    return read_outputs(attempts)[0]


def read_outputs(
    attempts: Sequence[Attempt],
) -> tuple[dict[int, dict[str, str]], dict[int, int]]:
    """outputs_of, and each attempt's next seq: where a live page that shows
    this text asks for more (read in the same query, so nothing falls between)."""
    parts = {a.pk: {"stdout": [], "stderr": [], "combined": []} for a in attempts}
    next_seq = dict.fromkeys(parts, 0)
    chunks = (
        LogChunk.objects.filter(attempt_id__in=list(parts))
        .order_by("attempt_id", "seq")
        .values_list("attempt_id", "seq", "stream", "data")
    )
    for attempt_id, seq, stream, data in chunks:
        parts[attempt_id][stream].append(data)
        parts[attempt_id]["combined"].append(data)
        next_seq[attempt_id] = seq + 1
    texts = {}
    for attempt in attempts:
        text = {key: "".join(value) for key, value in parts[attempt.pk].items()}
        if attempt.truncated:
            marker = truncation_marker(attempt)
            text = {key: value + marker for key, value in text.items()}
        texts[attempt.pk] = text
    return texts, next_seq


def chunks_after(run_id: int, cursors: dict[int, int], limit: int) -> list[tuple]:
    """(attempt, seq, stream, data) of the run's chunks at or after each attempt's
    cursor (its next seq), oldest first, in one query: what a live run page lacks."""
    if not cursors:
        return []
    wanted = Q()
    for attempt_id, seq in cursors.items():
        wanted |= Q(attempt_id=attempt_id, seq__gte=seq)
    return list(
        LogChunk.objects.filter(wanted, attempt__run_id=run_id)
        .order_by("attempt_id", "seq")
        .values_list("attempt_id", "seq", "stream", "data")[:limit]
    )


def truncation_marker(attempt: Attempt) -> str:
    return (
        f"\n[output truncated: kept {attempt.stored_bytes} of "
        f"{max(attempt.output_bytes, attempt.stored_bytes)} bytes]\n"
    )


def chunks_of(attempt_ids: Sequence[int]) -> Iterator[tuple[int, int, str, str]]:
    """(attempt id, seq, stream, data) of these attempts' chunks, by attempt
    then seq: one query, read CHUNKS_PER_READ rows at a time."""
    return (
        LogChunk.objects.filter(attempt_id__in=list(attempt_ids))
        .order_by("attempt_id", "seq")
        .values_list("attempt_id", "seq", "stream", "data")
        .iterator(chunk_size=CHUNKS_PER_READ)
    )


def iter_raw(attempt_id: int, stream: str | None = None) -> Iterator[str]:
    """An attempt's output exactly as stored (escape codes kept, secrets as
    masked on arrival), in seq order, optionally one stream only; read
    CHUNKS_PER_READ rows at a time (the unique (attempt, seq) index orders it),
    never held whole."""
    chunks = LogChunk.objects.filter(attempt_id=attempt_id)
    if stream is not None:
        chunks = chunks.filter(stream=stream)
    return (
        chunks.order_by("seq").values_list("data", flat=True).iterator(chunk_size=CHUNKS_PER_READ)
    )
