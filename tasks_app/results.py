"""A run's result, read back from the stored output of its attempts.

The result of a run that succeeded is its merge attempt's stdout, or without
a merge command the stdout of each shard's successful attempt, in shard
order. Nothing is copied at the end of a run: the result is read from the
log chunks (tasks_app.logs) whenever it is asked for, so it is as long as
what those kept (SCHEDULER_LOG_LIMIT_BYTES per attempt).

Reads are batched, whatever the shard count: one query for the order of the
chunks (ids only), then their text CHUNKS_PER_READ at a time, never a query
per chunk or per shard, and never more than a batch in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse

from tasks_app import shards
from tasks_app.batchsql import marks, select, table
from tasks_app.models import Attempt, LogChunk, Run

# How much of a result the API's run object and the run page show inline.
RESULT_INLINE_CHARS = 64 * 1024
CHUNKS_PER_READ = 100

CHUNK = table(LogChunk)


def result_attempt_ids(run: Run) -> list[int] | None:
    """The attempts whose stdout, in this order, is the run's result; None
    until the run has succeeded."""
    if run.status != Run.Status.SUCCEEDED:
        return None
    definition = run.definition
    count = shards.shard_count(definition)
    wanted = [count] if shards.has_merge(definition) else list(range(count))
    return succeeded_attempt_ids(run.pk, wanted)


def succeeded_attempt_ids(run_id: int, shard_indexes: Sequence[int]) -> list[int]:
    """The successful attempt of each of these shards of a run, in this order
    (a shard without one is left out)."""
    done = dict(
        Attempt.objects.filter(
            run_id=run_id, shard_index__in=list(shard_indexes), status=Attempt.Status.SUCCEEDED
        )
        .order_by("shard_index", "try_number")
        .values_list("shard_index", "pk")
    )
    return [done[i] for i in shard_indexes if i in done]


def _stdout_batches(attempt_ids: Sequence[int]) -> Iterator[list[tuple[int, int, str]]]:
    """The stdout chunks of these attempts as (position, attempt id, text), in
    order of attempt then seq: one query for their order (ids only), then
    their text CHUNKS_PER_READ at a time."""
    if not attempt_ids:
        return
    position = {pk: n for n, pk in enumerate(attempt_ids)}
    ids = list(position)
    order = select(
        f"SELECT id, attempt_id, seq FROM {CHUNK} WHERE attempt_id IN ({marks(ids)})"
        " AND stream = %s",
        [*ids, LogChunk.Stream.STDOUT],
    )
    order.sort(key=lambda row: (position[row[1]], row[2]))
    for start in range(0, len(order), CHUNKS_PER_READ):
        rows = order[start : start + CHUNKS_PER_READ]
        batch = [row[0] for row in rows]
        text = dict(select(f"SELECT id, data FROM {CHUNK} WHERE id IN ({marks(batch)})", batch))
        yield [(position[attempt_id], attempt_id, text[pk]) for pk, attempt_id, _ in rows]


def iter_stdout(attempt_ids: Sequence[int]) -> Iterator[str]:
    """The stdout of these attempts, one after the other, a batch of chunks per item."""
    for batch in _stdout_batches(attempt_ids):
        yield "".join(text for _, _, text in batch)


def iter_framed_stdout(attempt_ids: Sequence[int]) -> Iterator[bytes]:
    """The stdout of each of these attempts, in order, each framed as a line
    "<position> <byte length>\n" and then that many bytes: a merge's agent
    splits one response into one file per shard. Read like iter_stdout, a
    batch of chunks at a time; one attempt's stdout is held whole (it is
    capped by SCHEDULER_LOG_LIMIT_BYTES)."""
    current, pending = 0, []  # the position being read, and its chunks so far
    for batch in _stdout_batches(attempt_ids):
        for at, _, text in batch:
            while current < at:  # the ones before it are complete
                yield _framed(current, pending)
                current, pending = current + 1, []
            pending.append(text)
    while current < len(attempt_ids):
        yield _framed(current, pending)
        current, pending = current + 1, []


def _framed(index: int, parts: list[str]) -> bytes:
    data = "".join(parts).encode()
    return f"{index} {len(data)}\n".encode() + data


def head(attempt_ids: Sequence[int], limit: int = RESULT_INLINE_CHARS) -> tuple[str, bool]:
    """The first `limit` characters of these attempts' stdout, and whether there was more."""
    parts, size = [], 0
    for text in iter_stdout(attempt_ids):
        parts.append(text)
        size += len(text)
        if size > limit:
            return "".join(parts)[:limit], True
    return "".join(parts), False


def streamed(request, chunks: Iterator[str | bytes], *, filename: str) -> StreamingHttpResponse:
    """A text download of chunks read lazily, a batch at a time.

    Under ASGI (daphne) Django would read a synchronous iterator whole into
    memory before sending it, so there the batches come through an async
    generator, each read in the thread the ORM uses; the test client (WSGI)
    takes the iterator as it is.
    """
    encoded = (text if isinstance(text, bytes) else text.encode() for text in chunks)
    content = _async(encoded) if isinstance(request, ASGIRequest) else encoded
    response = StreamingHttpResponse(content, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


async def _async(chunks: Iterator[bytes]):
    step = sync_to_async(next, thread_sensitive=True)
    while (chunk := await step(chunks, None)) is not None:
        yield chunk
