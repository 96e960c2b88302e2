"""The browser's live socket: one per dashboard page, pushing what changed.

The page says what it shows (`watch`): its live regions, the run whose
output it holds and how far (per attempt, the next seq), and the last event
it reflects. The consumer listens to the events group (tasks_app.events) and,
on a run page, to the output group (tasks_app.logs). It decides which of its
regions an event touched (tasks_app.live), renders them on the server as the
user's own htmx request and sends the HTML; it reads a run's new output lines
after the page's cursors and sends them. Renders and reads are coalesced: at
most one pass per socket every COALESCE_S, each one trip to a thread, however
many events arrived meanwhile. Nothing is pushed that was not committed: it
all comes from the database after the commit's message.

Frames, browser -> server:
  {"type": "watch", "regions": [{"id", "src", "on"}], "page": its URL,
   "run": id|null, "output": {attempt_id: next_seq}, "since": event_id|null}
  {"type": "cursors", "output": {attempt_id: next_seq}}   (new output boxes)
server -> browser:
  {"type": "html", "id", "html", "last_id"}
  {"type": "output", "attempt", "stream", "seq", "text"}
  {"type": "error", "message"}
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection

from tasks_app import events, live, logs, roles

log = logging.getLogger(__name__)

COALESCE_S = 0.2  # at most one render pass per socket this often
MAX_FRAME = 64 * 1024  # a watch of 20 regions is a few KB
OUTPUT_ROWS = 2000  # chunks read per pass; a longer backlog takes more passes
MAX_CURSORS = 1000
# The live passes of every socket run in one thread of their own, not in the
# thread Django's sync views share under daphne: twenty open pages re-rendered
# after an event must not hold up the next page load. One thread keeps one
# database connection (as the writer's does) instead of one per pass.
_passes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-pass")
# Close codes (4000-4999: the application's own, RFC 6455 7.4.2).
REFUSED = 4403
BAD_FRAME = 4400


class LiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if not await database_sync_to_async(roles.allows)(user, roles.VIEWER):
            # Before accept: daphne answers the handshake with 403.
            await self.close(code=REFUSED)
            return
        self.user_id = user.pk
        self.regions: dict[str, live.Region] = {}
        self.run_id: int | None = None
        self.page = ""
        self.cursors: dict[int, int] = {}
        self.dirty: set[str] = set()
        self.output_due = False
        self.last_id = 0
        self.next_pass = 0.0
        self.flusher: asyncio.Task | None = None
        self.in_output_group = False
        await self.channel_layer.group_add(events.GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code) -> None:
        if not hasattr(self, "user_id"):
            return
        await self.channel_layer.group_discard(events.GROUP, self.channel_name)
        if self.in_output_group:
            await self.channel_layer.group_discard(logs.OUTPUT_GROUP, self.channel_name)
        if self.flusher is not None:
            self.flusher.cancel()

    # --- browser frames ------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        if text_data is None or len(text_data) > MAX_FRAME:
            await self._refuse("frames are JSON text of at most 64 KiB")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self._refuse("a frame is not JSON")
            return
        if not isinstance(content, dict):
            await self._refuse("a frame is a JSON object")
            return
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs) -> None:
        kind = content.get("type")
        try:
            if kind == "watch":
                await self._watch(content)
            elif kind == "cursors":
                self._add_cursors(content.get("output"))
                self._schedule(output=True)
            else:
                raise live.InvalidRegion(f"unknown frame type {kind!r}")
        except live.InvalidRegion as exc:
            await self.send_json({"type": "error", "message": str(exc)})

    async def _watch(self, content: dict) -> None:
        regions = await database_sync_to_async(live.parse_regions)(content.get("regions", []))
        run = content.get("run")
        if run is not None and (type(run) is not int or run <= 0):
            raise live.InvalidRegion("run is a run id or null")
        page = content.get("page") or ""
        if not isinstance(page, str) or len(page) > live.MAX_SRC:
            raise live.InvalidRegion("page is the page's URL")
        since = content.get("since")
        if since is not None and (type(since) is not int or since < 0):
            raise live.InvalidRegion("since is an event id or null")
        self.regions = regions
        self.page = page
        self.dirty &= set(regions)
        if run != self.run_id:
            self.cursors = {}
        self.run_id = run
        self._add_cursors(content.get("output") or {})
        if run is not None and not self.in_output_group:
            await self.channel_layer.group_add(logs.OUTPUT_GROUP, self.channel_name)
            self.in_output_group = True
        if since is not None:
            # Catch up: the regions that the events the page missed touched,
            # and the output lines stored after its cursors.
            missed = await database_sync_to_async(live.missed)(since)
            self.last_id = max(self.last_id, missed["last_id"], since)
            self.dirty |= live.affected(self.regions.values(), missed)
        self._schedule(output=run is not None)

    def _add_cursors(self, raw) -> None:
        if not isinstance(raw, dict) or len(raw) + len(self.cursors) > MAX_CURSORS:
            raise live.InvalidRegion("output is an object of attempt id: next seq")
        for key, value in raw.items():
            if not (isinstance(key, str) and key.isdigit()) or type(value) is not int or value < 0:
                raise live.InvalidRegion("output is an object of attempt id: next seq")
            attempt = int(key)
            self.cursors[attempt] = max(self.cursors.get(attempt, 0), value)

    async def _refuse(self, why: str) -> None:
        await self.send_json({"type": "error", "message": why})
        await self.close(code=BAD_FRAME)

    # --- group messages ------------------------------------------------------------

    async def events_committed(self, message: dict) -> None:
        self.last_id = max(self.last_id, message.get("last_id") or 0)
        hit = live.affected(self.regions.values(), message)
        if hit:
            self.dirty |= hit
            self._schedule()

    async def output_stored(self, message: dict) -> None:
        runs = message.get("runs")
        if self.run_id is not None and (runs is None or self.run_id in runs):
            self._schedule(output=True)

    # --- the coalesced pass ----------------------------------------------------------

    def _schedule(self, output: bool = False) -> None:
        self.output_due = self.output_due or (output and bool(self.cursors))
        if not (self.dirty or self.output_due):
            return
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self.dirty or self.output_due:
            wait = self.next_pass - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            regions = [self.regions[rid] for rid in sorted(self.dirty) if rid in self.regions]
            self.dirty = set()
            cursors = dict(self.cursors) if self.output_due and self.run_id else {}
            self.output_due = False
            self.next_pass = loop.time() + COALESCE_S
            last_id = self.last_id
            try:
                allowed, htmls, chunks = await loop.run_in_executor(
                    _passes, functools.partial(self._pass, regions, self.run_id, cursors)
                )
            except Exception:
                log.exception("a live pass failed")
                continue
            if not allowed:
                await self.close(code=REFUSED)
                return
            for rid, html in htmls:
                await self.send_json({"type": "html", "id": rid, "html": html, "last_id": last_id})
            for attempt, seq, stream, text in chunks:
                self.cursors[attempt] = max(self.cursors.get(attempt, 0), seq + 1)
                await self.send_json(
                    {
                        "type": "output",
                        "attempt": attempt,
                        "stream": stream,
                        "seq": seq,
                        "text": text,
                    }
                )
            if len(chunks) >= OUTPUT_ROWS:
                self.output_due = True  # more backlog: the next pass goes on

    def _pass(self, regions: list[live.Region], run_id: int | None, cursors: dict[int, int]):
        """In the passes' thread: the user again (a role taken away ends the
        socket), the regions' HTML and the run's new output."""
        try:
            return self._read(regions, run_id, cursors)
        except DatabaseError:
            # A broken connection: the next pass opens a new one.
            connection.close()
            raise

    def _read(self, regions: list[live.Region], run_id: int | None, cursors: dict[int, int]):
        user = get_user_model().objects.filter(pk=self.user_id).first()
        if not roles.allows(user, roles.VIEWER):
            return False, [], []
        htmls = []
        for region in regions:
            html = live.render(self.scope, user, region.src, self.page)
            if html is not None:
                htmls.append((region.id, html))
        chunks = logs.chunks_after(run_id, cursors, OUTPUT_ROWS) if run_id and cursors else []
        return True, htmls, chunks
