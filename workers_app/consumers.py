"""The agent websocket: translates frames into lifecycle calls and back."""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from tasks_app import lifecycle
from workers_app import dispatch, liveness, protocol
from workers_app.exceptions import ProtocolError
from workers_app.models import Worker

log = logging.getLogger(__name__)

# A rejected assignment is offered again after this long at the earliest.
REJECT_BACKOFF_S = 1.0

# Output is written in batches: at most this often, or sooner when this much waits.
LOG_FLUSH_S = 0.05
LOG_FLUSH_BYTES = 256 * 1024


def _result(frame: dict) -> lifecycle.Result:
    return lifecycle.Result(
        status=frame["status"],
        exit_code=frame["exit_code"],
        reason=frame.get("reason", ""),
        started_at=frame.get("started_at"),
        finished_at=frame.get("finished_at"),
        output_bytes=frame.get("output_bytes", 0),
        truncated=frame.get("truncated", False),
    )


class AgentConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.worker_id = self.scope.get("worker_id")
        if not self.worker_id:
            # Closing before accept makes daphne refuse the handshake with HTTP 403.
            await self.close(code=protocol.CLOSE_BAD_CREDENTIAL)
            return
        self.said_hello = False
        self.pending_logs: list[lifecycle.Chunk] = []
        self.pending_bytes = 0
        self.flush_lock = asyncio.Lock()
        self.flush_handle: asyncio.TimerHandle | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if not getattr(self, "worker_id", None):
            return
        await self.flush_logs()
        await database_sync_to_async(liveness.disconnected)(self.worker_id, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            frame = protocol.parse(text_data, settings.SCHEDULER_MAX_FRAME_BYTES)
        except ProtocolError as exc:
            await self.send_json(protocol.error(exc.code, exc.message))
            return
        if not self.said_hello and frame["type"] != "hello":
            await self.send_json(protocol.error("hello_first", "send hello before any other frame"))
            return
        try:
            await getattr(self, f"on_{frame['type']}")(frame)
        except Exception:
            # A bug or a database hiccup on one frame must not kill the connection
            # (its disconnect handler would never run). Nothing was acknowledged,
            # so the agent repeats what matters: results are replayed on reconnect.
            log.exception("worker %s: handling a %s frame failed", self.worker_id, frame["type"])
            await self.send_json(
                protocol.error(
                    "internal_error", f"the master could not handle this {frame['type']}"
                )
            )

    # --- frames from the agent -------------------------------------------------

    async def on_hello(self, frame: dict) -> None:
        reconciled = await database_sync_to_async(liveness.hello)(
            self.worker_id, self.channel_name, frame
        )
        self.said_hello = True
        await self.send_json(
            protocol.welcome(
                reconciled.worker,
                heartbeat_s=settings.SCHEDULER_HEARTBEAT_S,
                log_limit_bytes=settings.SCHEDULER_LOG_LIMIT_BYTES,
                max_frame_bytes=settings.SCHEDULER_MAX_FRAME_BYTES,
                lost_after_s=settings.SCHEDULER_LOST_AFTER_S,
                self_fence=settings.SCHEDULER_SELF_FENCE,
            )
        )
        for attempt_id in reconciled.cancel:
            await self.send_json(protocol.cancel(attempt_id))
        for assign in reconciled.resend:
            await self.send_json(assign)
        if reconciled.worker.state in (Worker.State.DRAINING, Worker.State.DISABLED):
            await self.send_json({"type": "drain"})
        if reconciled.lost:
            log.warning(
                "worker %s reconnected without attempts %s: marked lost",
                self.worker_id,
                reconciled.lost,
            )
        await self._dispatch()

    async def on_heartbeat(self, frame: dict) -> None:
        await database_sync_to_async(liveness.heartbeat)(
            self.worker_id, frame.get("draining", False)
        )

    async def on_accepted(self, frame: dict) -> None:
        ok = await database_sync_to_async(lifecycle.mark_accepted)(self.worker_id, frame["attempt"])
        if not ok:
            # Re-queued meanwhile (accept timeout) or cancelled: it must not run here.
            await self.send_json(protocol.cancel(frame["attempt"]))

    async def on_rejected(self, frame: dict) -> None:
        # The agent knows better than our slot count (it is draining, or still
        # runs something we gave up on): back off before it is offered again,
        # or the same assign/reject pair would bounce as fast as the socket allows.
        await database_sync_to_async(lifecycle.requeue)(
            self.worker_id, [frame["attempt"]], delay_s=REJECT_BACKOFF_S
        )

    async def on_started(self, frame: dict) -> None:
        ok = await database_sync_to_async(lifecycle.mark_started)(
            self.worker_id, frame["attempt"], frame.get("started_at"), frame.get("pid")
        )
        if not ok:
            await self.send_json(
                protocol.error(
                    "unknown_attempt",
                    "no such attempt is assigned to you",
                    attempt=frame["attempt"],
                )
            )

    async def on_log(self, frame: dict) -> None:
        data = frame["data"]
        self.pending_logs.append(
            lifecycle.Chunk(frame["attempt"], frame["seq"], frame["stream"], data)
        )
        self.pending_bytes += len(data)
        if self.pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush_logs()
        elif self.flush_handle is None:
            loop = asyncio.get_running_loop()
            self.flush_handle = loop.call_later(
                LOG_FLUSH_S, lambda: asyncio.ensure_future(self.flush_logs())
            )

    async def on_finished(self, frame: dict) -> None:
        # Every log frame of the attempt came before this one: store them first.
        await self.flush_logs()
        outcome = await database_sync_to_async(lifecycle.finish)(
            self.worker_id, frame["attempt"], _result(frame)
        )
        if outcome is lifecycle.Outcome.UNKNOWN:
            await self.send_json(
                protocol.error(
                    "unknown_attempt",
                    "no such attempt is assigned to you",
                    attempt=frame["attempt"],
                )
            )
        # Acknowledge duplicates, late and unknown ones too, so the agent's spool drains.
        await self.send_json(protocol.ack(frame["attempt"]))
        if outcome is lifecycle.Outcome.STORED:
            await self._dispatch()

    # --- internals -------------------------------------------------------------

    async def flush_logs(self) -> None:
        async with self.flush_lock:
            if self.flush_handle is not None:
                self.flush_handle.cancel()
                self.flush_handle = None
            chunks, self.pending_logs, self.pending_bytes = self.pending_logs, [], 0
            if not chunks:
                return
            try:
                acked, refused = await database_sync_to_async(lifecycle.append_logs)(
                    self.worker_id, chunks
                )
            except Exception:
                # Not acknowledged, so the agent still holds these frames: make it
                # reconnect and resend them rather than keep them here unbounded.
                log.exception("storing output of worker %s failed; reconnecting it", self.worker_id)
                await self.close(code=protocol.CLOSE_TRY_AGAIN)
                return
        # One acknowledgement per attempt per batch: the agent may forget those frames.
        for attempt_id, seq in sorted(acked.items()):
            await self.send_json(protocol.log_ack(attempt_id, seq))
        for attempt_id in sorted(refused):
            await self.send_json(
                protocol.error(
                    "unknown_attempt", "output for an attempt you do not run", attempt=attempt_id
                )
            )

    async def _dispatch(self) -> None:
        await database_sync_to_async(dispatch.dispatch)()

    # --- messages from the rest of the master ----------------------------------

    async def agent_frames(self, event: dict) -> None:
        for frame in event["frames"]:
            await self.send_json(frame)

    async def agent_close(self, event: dict) -> None:
        await self.close(code=event["code"])
