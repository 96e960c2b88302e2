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
   "run": id|null, "output": {attempt_id: next_seq},
   "states": {attempt_id: renderer state|null}, "since": event_id|null}
  {"type": "cursors", "output": {...}, "states": {...}}   (new output boxes)
server -> browser:
  {"type": "html", "id", "html", "last_id"}
  {"type": "output", "attempt", "seq", "html", "tail", "state"}
  {"type": "error", "message"}

Output goes out as the page's own markup (tasks_app.output_view): the lines a
batch of chunks completes (`html`), and the lines not ended yet (`tail`, which
replaces the previous tail). The renderer's state after each attempt's last
chunk (colours, the unfinished line, the line count) travels with it; the page
gives it back on a new socket, so a reconnect goes on where it stopped. A
state the page does not have is rebuilt from the attempt's earlier chunks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from operator import itemgetter

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection

from tasks_app import events, live, logs, output_view, roles

log = logging.getLogger(__name__)

COALESCE_S = 0.2  # at most one render pass per socket this often
RETRY_S = 2.0  # after a pass that failed (the database away), the next one
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
        # attempt id -> the renderer's state at its cursor (None: rebuild it)
        self.states: dict[int, output_view.State | None] = {}
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
                self._add_cursors(content.get("output"), content.get("states"))
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
            self.cursors, self.states = {}, {}
        self.run_id = run
        self._add_cursors(content.get("output") or {}, content.get("states"))
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

    def _add_cursors(self, raw, states=None) -> None:
        bad = "output is an object of attempt id: next seq"
        if (
            not isinstance(raw, dict)
            or len(set(raw) | {str(a) for a in self.cursors}) > MAX_CURSORS
        ):
            raise live.InvalidRegion(bad)
        if states is None:
            states = {}
        if not isinstance(states, dict):
            raise live.InvalidRegion("states is an object of attempt id: renderer state")
        for key, value in raw.items():
            if not (isinstance(key, str) and key.isdigit()) or type(value) is not int or value < 0:
                raise live.InvalidRegion(bad)
            attempt = int(key)
            if value < self.cursors.get(attempt, 0):
                continue  # the socket is further on already, with its state
            try:
                given = states.get(key)
                state = None if given is None else output_view.State.from_dict(given)
            except ValueError as exc:
                raise live.InvalidRegion(f"states: {exc}") from None
            self.cursors[attempt] = value
            self.states[attempt] = state

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
            states = {a: self.states.get(a) for a in cursors}
            self.output_due = False
            self.next_pass = loop.time() + COALESCE_S
            last_id = self.last_id
            try:
                allowed, htmls, outputs, read = await loop.run_in_executor(
                    _passes, functools.partial(self._pass, regions, self.run_id, cursors, states)
                )
            except Exception:
                log.exception("a live pass failed")
                # Not dropped: what it was to send is tried again on the next pass.
                self.dirty |= {region.id for region in regions}
                self.output_due = self.output_due or bool(cursors)
                self.next_pass = loop.time() + RETRY_S
                continue
            if not allowed:
                await self.close(code=REFUSED)
                return
            for rid, html in htmls:
                await self.send_json({"type": "html", "id": rid, "html": html, "last_id": last_id})
            for attempt, seq, html, tail, state in outputs:
                if seq < self.cursors.get(attempt, 0):
                    continue  # a newer watch moved past it meanwhile
                self.cursors[attempt] = seq + 1
                self.states[attempt] = state
                frame = {"type": "output", "attempt": attempt, "seq": seq}
                frame |= {"html": html, "tail": tail, "state": state.as_dict()}
                await self.send_json(frame)
            if read >= OUTPUT_ROWS:
                self.output_due = True  # more backlog: the next pass goes on

    def _pass(self, regions: list[live.Region], run_id: int | None, cursors: dict, states: dict):
        """In the passes' thread: the user again (a role taken away ends the
        socket), the regions' HTML and the run's new output."""
        try:
            return self._read(regions, run_id, cursors, states)
        except DatabaseError:
            # A broken connection: the next pass opens a new one.
            connection.close()
            raise

    def _read(self, regions: list[live.Region], run_id: int | None, cursors: dict, states: dict):
        user = get_user_model().objects.filter(pk=self.user_id).first()
        if not roles.allows(user, roles.VIEWER):
            return False, [], [], 0
        htmls = []
        for region in regions:
            html = live.render(self.scope, user, region.src, self.page)
            if html is not None:
                htmls.append((region.id, html))
        chunks = logs.chunks_after(run_id, cursors, OUTPUT_ROWS) if run_id and cursors else []
        outputs = []
        for attempt, group in groupby(chunks, key=itemgetter(0)):
            rows = list(group)
            state = states.get(attempt)
            if state is None:
                state = output_view.state_at(attempt, cursors[attempt])
            html, state = output_view.render(((s, d) for _, _, s, d in rows), state)
            outputs.append((attempt, rows[-1][1], html, output_view.tail(state), state))
        return True, htmls, outputs, len(chunks)
