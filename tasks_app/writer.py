"""The server's one writer: group commit for the hot paths.

Agent consumers, the trigger endpoints and the scheduler service do not each
open a transaction per event. They submit jobs; the writer applies whatever
has accumulated in one short transaction, on the one database thread, then
answers each job. While one batch is written the next accumulates, so batches
grow with the load and an idle server answers at once: a burst of a thousand
results is a few transactions, not a thousand.

Kinds of job and their handlers are registered by the apps (tasks_app
registers triggers, workers_app the agents' messages), so this module knows
nothing of workers. A handler takes the payloads of one kind in submission
order and returns one result each; a result that is an exception is raised
to its submitter alone. Follow-ups (dispatch) are requested from anywhere,
coalesced, and run after the batch in their own transactions.

Without a running event loop (management commands, the Django test client)
`submit_sync` applies a job at once in the caller's thread: the same
handlers, one job per transaction.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from asgiref.sync import async_to_sync
from channels.consumer import get_handler_name
from django.db import DatabaseError, connection, transaction

from tasks_app import events

log = logging.getLogger(__name__)

Handler = Callable[[list[Any]], list[Any]]
# The kind of a job that is a plain call, run alone after the batch's
# transaction (the scheduler service's duties, which open their own).
CALL = "call"


@dataclass(frozen=True)
class _Kind:
    handler: Handler
    order: int  # kinds are applied in this order within a batch


@dataclass
class _Job:
    kind: str
    payload: Any
    future: asyncio.Future | None = None


class Writer:
    def __init__(self) -> None:
        self._kinds: dict[str, _Kind] = {}
        self._followups: dict[str, Callable[[], object]] = {}
        # Requested follow-ups: from the loop (and other threads, through it), and
        # from the writer's own thread while it applies; each set has one owner.
        self._requested: set[str] = set()
        self._requested_here: set[str] = set()
        self._pending: list[_Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._local = threading.local()
        self._after: list[Callable[[], object]] = []
        self.batches = 0  # applied so far, for tests and diagnostics

    # --- registration ------------------------------------------------------------

    def register(self, kind: str, handler: Handler, order: int) -> None:
        self._kinds[kind] = _Kind(handler, order)

    def register_followup(self, name: str, run: Callable[[], object]) -> None:
        self._followups[name] = run

    # --- submitting --------------------------------------------------------------

    async def submit(self, kind: str, payload: Any) -> Any:
        """From the event loop: apply with the next batch and return the result."""
        return await self.submit_nowait(kind, payload)

    def submit_nowait(self, kind: str, payload: Any) -> asyncio.Future:
        """From the event loop, without waiting: a future of the result (pipelining)."""
        self._ensure_running()
        future = self._loop.create_future()
        self._pending.append(_Job(kind, payload, future))
        self._wake.set()
        return future

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run function in the database thread between batches; return its result."""
        return await self.submit(CALL, function)

    def submit_sync(self, kind: str, payload: Any) -> Any:
        """From a thread that is not the event loop's: the same, blocking."""
        if self._serving():
            coroutine = self.submit(kind, payload)
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
        [result] = self._apply_alone([_Job(kind, payload)])
        if isinstance(result, BaseException):
            raise result
        return result

    def request(self, followup: str) -> None:
        """Run a follow-up after the current or next batch. Safe from any thread."""
        if getattr(self._local, "applying", False):
            self._requested_here.add(followup)  # we are the writer: run after this batch
        elif self._serving():
            self._loop.call_soon_threadsafe(self._request_in_loop, followup)
        else:
            self._run_followups({followup})

    def soon(self, callback: Callable[[], object], loop: asyncio.AbstractEventLoop) -> None:
        """Run callback on that loop: from the writer, after the batch's answers
        are out (so an agent hears "ack" before the assignment that took the
        freed slot); from elsewhere, at the loop's next turn."""
        if getattr(self._local, "applying", False) and loop is self._loop:
            self._after.append(callback)
        else:
            loop.call_soon_threadsafe(callback)

    def spawn(self, make: Callable[[], Awaitable[object]], what: str) -> None:
        """Run a coroutine on the server's loop (a channel-layer send), from any
        thread; where no loop serves (a management command), run it here."""
        if not self._serving():
            async_to_sync(make)()
            return

        def start() -> None:
            task = self._loop.create_task(make())
            task.add_done_callback(lambda t: t.cancelled() or _log_failure(t, what))

        self.soon(start, self._loop)

    def _request_in_loop(self, followup: str) -> None:
        self._requested.add(followup)
        if self._wake is not None:
            self._wake.set()

    def _serving(self) -> bool:
        return (
            self._loop is not None
            and self._loop.is_running()
            and self._task is not None
            and not self._task.done()
        )

    # --- the loop ---------------------------------------------------------------

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        # A new event loop (a test's, or after a restart): start afresh on it.
        self._loop = loop
        self._pending = []
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="scheduler-writer")

    def start(self) -> None:
        """Start on the running loop (the server does this at start-up)."""
        self._ensure_running()

    async def _run(self) -> None:
        # A thread of its own: Django keeps a connection per thread, and nobody
        # else's close_old_connections() (Channels runs one before every consumer
        # message) may close this one between batches.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheduler-writer")

        async def apply(batch: list[_Job], followups: set[str]) -> list[Any]:
            return await self._loop.run_in_executor(executor, self._apply, batch, followups)

        try:
            await self._serve(apply)
        finally:
            executor.shutdown(wait=False)

    async def _serve(self, apply) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            followups, self._requested = self._requested, set()
            try:
                results = await apply(batch, followups)
            except Exception as exc:  # only a bug in the writer itself gets here
                log.exception("writer batch failed")
                results = [exc] * len(batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue  # the submitter stopped waiting (its task was cancelled)
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            after, self._after = self._after, []
            for callback in after:
                # Queued behind the wake-ups of the submitters just answered.
                self._loop.call_soon(callback)
            if self._requested:
                self._wake.set()

    # --- applying (in the database thread) -----------------------------------------

    def _apply(self, batch: list[_Job], followups: set[str]) -> list[Any]:
        self._local.applying = True
        try:
            jobs = [job for job in batch if job.kind != CALL]
            answers = iter(self._apply_batch(jobs) if jobs else [])
            results = [
                self._call(job.payload) if job.kind == CALL else next(answers) for job in batch
            ]
            for _ in range(3):  # a follow-up may ask for another (a pass that re-queued work)
                followups |= self._requested_here
                self._requested_here = set()
                if not followups:
                    break
                self._run_followups(followups)
                followups = set()
            return results
        finally:
            self._local.applying = False

    def _call(self, function: Callable[[], Any]) -> Any:
        try:
            return function()
        except Exception as exc:
            self._recover()
            return exc

    def _apply_batch(self, batch: list[_Job]) -> list[Any]:
        results, failure = self._commit(batch)
        if failure is None:
            self.batches += 1
            return results
        # One bad job must not fail the others: apply each alone.
        log.warning("a batch of %d jobs failed (%s); applying them one by one", len(batch), failure)
        return self._apply_alone(batch)

    def _apply_alone(self, batch: list[_Job]) -> list[Any]:
        answers = []
        for job in batch:
            results, failure = self._commit([job])
            if failure is not None:
                log.error("job %s failed", job.kind, exc_info=failure)
            answers.append(results[0] if failure is None else failure)
        return answers

    def _commit(self, jobs: list[_Job]) -> tuple[list[Any], Exception | None]:
        """Apply jobs in one transaction: (results, None), or (None, the error)
        when nothing of it was committed."""
        committed = []
        results = None
        try:
            with transaction.atomic():
                # The first hook to run after the commit: from then on the jobs
                # are in the database, whatever a later hook does.
                transaction.on_commit(lambda: committed.append(True))
                # The batch's events: one INSERT, before the commit.
                with events.gathered():
                    results = self._handle(jobs)
        except Exception as exc:
            if not committed:
                self._recover()
                return None, exc
            # Only something after the commit failed (hooks are robust, so this
            # is a bug of ours): applying the jobs again would apply them twice.
            log.exception("after committing %d jobs", len(jobs))
        return results, None

    def _handle(self, batch: list[_Job]) -> list[Any]:
        by_kind: dict[str, list[int]] = {}
        for index, job in enumerate(batch):
            by_kind.setdefault(job.kind, []).append(index)
        results: list[Any] = [None] * len(batch)
        for kind in sorted(by_kind, key=lambda k: self._kinds[k].order):
            indexes = by_kind[kind]
            answers = self._kinds[kind].handler([batch[i].payload for i in indexes])
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer
        return results

    def _run_followups(self, names: set[str]) -> None:
        for name, run in self._followups.items():
            if name not in names:
                continue
            try:
                run()
            except Exception:
                # The service's periodic pass catches up with whatever this missed.
                self._recover()
                log.exception("follow-up %s failed", name)

    def _recover(self) -> None:
        """After a database error: drop a broken connection so the next batch reconnects."""
        try:
            connection.close_if_unusable_or_obsolete()
        except DatabaseError:
            connection.close()


def _log_failure(task: asyncio.Task, what: str) -> None:
    if task.exception() is not None:
        log.error("%s failed", what, exc_info=task.exception())


writer = Writer()


class WriterClientMixin:
    """For consumers whose database work all goes through the writer.

    Channels closes old database connections before every message a consumer
    handles, a hop to a thread and back each time; these consumers hold no
    connection, so their messages go straight to their handlers.
    """

    async def dispatch(self, message):
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
