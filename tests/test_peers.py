"""Servers telling each other about queued work, through a real Redis channel layer."""

from __future__ import annotations

import asyncio

import pytest
from channels_redis.core import RedisChannelLayer

from tests.engines import REDIS_URL, create_prefix, drop_prefix
from workers_app.peers import Peers

pytestmark = pytest.mark.scale_out


class Recording(Peers):
    def __init__(self, layer) -> None:
        super().__init__(layer)
        self.received: list[dict] = []
        self.arrived = asyncio.Event()

    def on_message(self, message: dict) -> None:
        self.received.append(message)
        self.arrived.set()


@pytest.fixture
def prefix():
    own = create_prefix()
    yield own
    drop_prefix(own)


def _layer(prefix: str) -> RedisChannelLayer:
    # Each server process has its own layer object on the same Redis and prefix.
    return RedisChannelLayer(hosts=[{"address": REDIS_URL, "socket_timeout": 15}], prefix=prefix)


async def test_it_tells_every_other_server_which_label_sets_to_look_at(prefix):
    a, b, c = (Recording(_layer(prefix)) for _ in range(3))
    stopping = asyncio.Event()
    joined = [asyncio.Event() for _ in range(3)]
    tasks = [
        asyncio.create_task(peer.run(stopping, ready))
        for peer, ready in zip((a, b, c), joined, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(j.wait() for j in joined)), 10)
        await a.send_work_queued({"linux,gpu", ""})
        await asyncio.wait_for(asyncio.gather(b.arrived.wait(), c.arrived.wait()), 10)
        for peer in (b, c):
            assert [(m["type"], m["keys"]) for m in peer.received] == [
                ("servers.work_queued", ["", "linux,gpu"])
            ]
        await a.send_work_queued(None)  # a pause or resume: re-read everything
        b.arrived.clear()
        await asyncio.wait_for(b.arrived.wait(), 10)
        assert b.received[-1]["keys"] is None
        # Nobody hears its own message back.
        await asyncio.sleep(0.3)
        assert a.received == []
        assert (b.heard, c.heard) == (2, 2)
    finally:
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_server_without_a_shared_layer_tells_nobody():
    alone = Peers()  # settings: the in-memory layer, one server process
    assert not alone.active()
    await alone.run(asyncio.Event())  # returns at once
    assert alone.channel is None
    alone.tell_work_queued({"x"})  # nothing to send, nothing raised
