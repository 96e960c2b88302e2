"""The agent websocket: translates messages into writer jobs and answers back.

A message (one frame, or with protocol 2 an array of frames) is checked, then
handed to the writer without waiting, so the consumer keeps reading while
earlier messages are applied: frames from many agents within a few
milliseconds land in one transaction. Answers go out in the order of the
messages they answer: an error about a bad frame waits behind the answers to
earlier messages (within one message, its errors come first). Frames for the
agent (answers, assignments, cancels) that are ready in one turn of the event
loop leave as one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from scheduler_site.wire import MAX_FRAME_BYTES, PROTOCOL_VERSION
from tasks_app.writer import WriterClientMixin, writer
from workers_app import delivery, liveness, metrics, protocol
from workers_app.liveness import Hello, WorkerGone
from workers_app.models import Worker
from workers_app.reports import Message

log = logging.getLogger(__name__)

# Messages handed to the writer and not answered yet, and their size; past
# either the consumer stops reading the socket until the oldest is answered.
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 4 * 1024 * 1024
# How often a consumer holding back notes its agent as heard from.
SEEN_WHILE_WAITING_S = 0.5


class AgentConsumer(WriterClientMixin, AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.worker_id = self.scope.get("worker_id")
        if not self.worker_id:
            # Closing before accept makes daphne refuse the handshake with HTTP 403.
            await self.close(code=protocol.CLOSE_BAD_CREDENTIAL)
            return
        self.loop = asyncio.get_running_loop()
        self.protocol = 1  # until the hello says which
        self.said_hello = False
        self.welcomed = False
        self.agent_draining = False
        self.held: list[dict] = []  # frames that came before the welcome went out
        self.outbox: list[dict] = []
        self.sending = False
        # Answers in message order: a future of the writer, or frames ready now.
        self.answers: deque[tuple[asyncio.Future | None, list[dict], list[str]]] = deque()
        self.inflight_bytes = 0  # of the messages behind the futures in answers
        self.answering: asyncio.Task | None = None
        await self.accept()
        self.counted = True  # in the sockets gauge, until disconnect
        metrics.AGENT_SOCKETS.inc()

    async def disconnect(self, code: int) -> None:
        if not getattr(self, "worker_id", None):
            return
        if getattr(self, "counted", False):
            self.counted = False
            metrics.AGENT_SOCKETS.dec()
        delivery.unregister(self.worker_id, self)
        if self.answering is not None:
            self.answering.cancel()
        # Jobs already handed over are still applied; this one comes after them.
        with contextlib.suppress(Exception):
            await writer.submit("disconnect", (self.worker_id, self.channel_name))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Any message is a sign of life, noted before it waits for anything.
        liveness.seen(self.worker_id)
        frames, errors = protocol.parse_message(text_data, settings.SCHEDULER_MAX_FRAME_BYTES)
        metrics.frames_received(frames, len(errors))
        size = len(text_data or "")
        if errors:
            self._answer(None, errors)
        batch: list[dict] = []
        for frame in frames:
            kind = frame["type"]
            if kind == "hello":
                self._submit(batch, size)
                batch = []
                await self.on_hello(frame)
            elif not self.said_hello:
                self._answer(
                    None, [protocol.error("hello_first", "send hello before any other frame")]
                )
            elif kind == "heartbeat":
                self.on_heartbeat(frame)
            else:
                batch.append(frame)
        self._submit(batch, size)
        while len(self.answers) > MAX_INFLIGHT or self.inflight_bytes > MAX_INFLIGHT_BYTES:
            # Backpressure: the agent waits for us instead of our memory growing.
            # Its frames wait unread meanwhile, heartbeats too: we are the reason
            # it looks silent, so it keeps counting as heard from.
            liveness.seen(self.worker_id)
            future = self.answers[0][0]
            if future is not None and not future.done():
                await asyncio.wait([future], timeout=SEEN_WHILE_WAITING_S)
            await asyncio.sleep(0)

    # --- frames from the agent -------------------------------------------------

    async def on_hello(self, frame: dict) -> None:
        await self._answered()  # reconcile against everything reported before
        self.protocol = min(frame["protocol"], PROTOCOL_VERSION)
        # Registered before the hello is applied, so that assignments made right
        # after it come straight here; they are held until the welcome is out.
        delivery.register(self.worker_id, self)
        try:
            reconciled = await writer.submit(
                "hello", Hello(self.worker_id, self.channel_name, frame)
            )
        except WorkerGone:
            delivery.unregister(self.worker_id, self)
            await self.close(code=protocol.CLOSE_REVOKED)
            return
        except Exception:
            log.exception("worker %s: handling a hello failed", self.worker_id)
            self._answer(
                None, [protocol.error("internal_error", "the master could not handle this hello")]
            )
            return
        self.said_hello = True
        self.agent_draining = bool(frame.get("draining"))
        frames = [
            protocol.welcome(
                reconciled.worker,
                protocol=self.protocol,
                heartbeat_s=settings.SCHEDULER_HEARTBEAT_S,
                log_limit_bytes=settings.SCHEDULER_LOG_LIMIT_BYTES,
                max_frame_bytes=settings.SCHEDULER_MAX_FRAME_BYTES,
                lost_after_s=settings.SCHEDULER_LOST_AFTER_S,
                self_fence=settings.SCHEDULER_SELF_FENCE,
            )
        ]
        frames += [protocol.cancel(attempt_id) for attempt_id in reconciled.cancel]
        frames += reconciled.resend
        if reconciled.worker.state in (Worker.State.DRAINING, Worker.State.DISABLED):
            frames.append(protocol.drain())
        if reconciled.lost:
            log.warning(
                "worker %s reconnected without attempts %s: marked lost",
                self.worker_id,
                reconciled.lost,
            )
        self.welcomed = True
        held, self.held = self.held, []
        self.push(frames + held)

    def on_heartbeat(self, frame: dict) -> None:
        if frame.get("draining") and not self.agent_draining:
            self.agent_draining = True
            self._answer(writer.submit_nowait("draining", self.worker_id), [], ["heartbeat"])

    def _submit(self, frames: list[dict], size: int) -> None:
        if frames:
            future = writer.submit_nowait("agent", Message(self.worker_id, frames))
            self.inflight_bytes += size
            future.add_done_callback(lambda _: self._landed(size))
            self._answer(future, [], [f["type"] for f in frames])

    def _landed(self, size: int) -> None:
        self.inflight_bytes -= size

    # --- answers, in order ------------------------------------------------------

    def _answer(self, future: asyncio.Future | None, frames: list[dict], kinds=()) -> None:
        if future is None and not self.answers:
            self.push(frames)  # nothing to wait behind
            return
        self.answers.append((future, frames, list(kinds)))
        if self.answering is None or self.answering.done():
            self.answering = self.loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        while self.answers:
            future, frames, kinds = self.answers[0]
            if future is not None:
                try:
                    frames = (await future) or []
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug or a database hiccup must not kill the connection (its
                    # disconnect handler would never run). Nothing was acknowledged,
                    # so the agent repeats what matters.
                    log.exception("worker %s: handling %s failed", self.worker_id, kinds)
                    frames = [
                        protocol.error("internal_error", f"the master could not handle this {kind}")
                        for kind in dict.fromkeys(kinds)
                    ]
                    if "log" in kinds:
                        # The agent resends unacknowledged output only after a
                        # reconnect: make it reconnect rather than keep it waiting.
                        self.push(frames)
                        self.answers.clear()
                        await self.close(code=protocol.CLOSE_TRY_AGAIN)
                        return
            self.answers.popleft()
            self.push(frames)

    async def _answered(self) -> None:
        """Wait until every message so far is answered."""
        while self.answering is not None and not self.answering.done():
            await asyncio.wait([self.answering])

    # --- frames to the agent -------------------------------------------------------

    def push(self, frames: list[dict]) -> None:
        """Queue frames for the agent; what is queued in one loop turn leaves together."""
        if not frames:
            return
        if not self.welcomed:
            # Nothing but answers to bad frames may precede the welcome.
            self.held += [f for f in frames if f["type"] != "error"]
            frames = [f for f in frames if f["type"] == "error"]
            if not frames:
                return
        self.outbox += frames
        if not self.sending:
            self.sending = True
            self.loop.call_soon(lambda: self.loop.create_task(self._send_outbox()))

    async def _send_outbox(self) -> None:
        try:
            while self.outbox:
                frames, self.outbox = self.outbox, []
                for text in protocol.encode(frames, self.protocol, MAX_FRAME_BYTES):
                    try:
                        await self.send(text_data=text)
                    except Exception:
                        # One message that cannot go (the socket is closing) must
                        # not take the others with it: what it carried is
                        # reconciled on the agent's next hello, or re-sent.
                        log.exception("worker %s: a message to the agent failed", self.worker_id)
        finally:
            self.sending = False

    def close_soon(self, code: int) -> None:
        self.loop.create_task(self.close(code=code))

    # --- messages from other server processes ----------------------------------

    async def agent_frames(self, event: dict) -> None:
        self.push(event["frames"])

    async def agent_close(self, event: dict) -> None:
        await self.close(code=event["code"])
