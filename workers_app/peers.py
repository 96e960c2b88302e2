"""What server processes of one install tell each other, through the channel layer.

The database is the truth, and each server's dispatch board (what it knows
of free slots and queued label sets) is a hint it rebuilds every tick. Work
queued through server A may fit a free slot of an agent on server B, which
A's board may not know of yet (B's agents' results freed it): without a
word from A, B would find it only at its next tick. So after every commit
that queued work (or paused, resumed), a server tells the others which label
sets to look at, and each runs a pass. Messages may be lost (Redis down, a
server restarting): the tick's rebuild catches up, and the claims in the
database decide every race whatever anyone was told.

Only with a shared channel layer (settings.SCALE_OUT); one server alone has
nobody to tell.
"""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer
from django.conf import settings

from tasks_app.writer import writer
from workers_app import dispatch

log = logging.getLogger(__name__)

GROUP = "scheduler.servers"
# channels_redis forgets group members after a day; we rejoin well before.
REJOIN_S = 600.0


class Peers:
    def __init__(self, layer=None) -> None:
        self._layer = layer  # None: the configured channel layer
        self.channel: str | None = None
        self.heard = 0  # messages received from other servers, for tests

    @property
    def layer(self):
        return self._layer or get_channel_layer()

    def active(self) -> bool:
        return self._layer is not None or settings.SCALE_OUT

    async def run(self, stopping: asyncio.Event, joined: asyncio.Event | None = None) -> None:
        """Listen for the other servers until stopping is set."""
        if not self.active():
            return
        layer = self.layer
        # The layer's default prefix: channels_redis has one receive loop per
        # process, on the "specific.<process>!" list; a channel under another
        # prefix would hold that loop on a list no agent's frames come to.
        self.channel = await layer.new_channel()
        loop = asyncio.get_running_loop()
        last_join = None
        try:
            while not stopping.is_set():
                try:
                    if last_join is None or loop.time() - last_join >= REJOIN_S:
                        await layer.group_add(GROUP, self.channel)
                        last_join = loop.time()
                        if joined is not None:
                            joined.set()
                    message = await asyncio.wait_for(layer.receive(self.channel), REJOIN_S)
                except TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Redis out of reach (at start, or later): the ticks keep
                    # dispatch going meanwhile, and we join again once it is back.
                    log.exception("listening to the other servers failed; retrying in 1s")
                    last_join = None
                    await asyncio.sleep(1.0)
                    continue
                if message.get("from") == self.channel:
                    continue  # our own, back from the group
                self.heard += 1
                self.on_message(message)
        finally:
            channel, self.channel = self.channel, None
            try:
                await layer.group_discard(GROUP, channel)
            except Exception:
                log.warning("leaving the servers' group failed (it expires by itself)")

    def on_message(self, message: dict) -> None:
        if message.get("type") == "servers.work_queued":
            keys = message.get("keys")
            dispatch.wake(None if keys is None else [str(k) for k in keys])

    async def send_work_queued(self, keys) -> None:
        if self.channel is None:
            return
        message = {
            "type": "servers.work_queued",
            "keys": None if keys is None else sorted(keys),
            "from": self.channel,
        }
        await self.layer.group_send(GROUP, message)

    def tell_work_queued(self, keys) -> None:
        """From any thread, after a commit: a message to every other server."""
        if self.channel is not None:
            writer.spawn(lambda: self.send_work_queued(keys), "telling the other servers")


peers = Peers()


def on_work_queued(sender, labels_keys=None, **kwargs) -> None:
    peers.tell_work_queued(labels_keys)
