"""Getting frames to agents: to the one connection that serves each worker.

Agent consumers of this process register themselves in LOCAL when their
hello is applied; frames for them are handed over on their event loop, with
no channel layer in between. A worker served by another server process is
reached through the channel layer, addressed to its connection's channel
(Worker.channel_name), never a group: an old socket of the same worker never
sees them. A worker with no connection gets nothing: its next hello is
reconciled from the database, which is the source of truth.

Everything here is safe to call from any thread.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from channels.layers import get_channel_layer

from tasks_app.writer import writer
from workers_app.models import Worker

if TYPE_CHECKING:
    from workers_app.consumers import AgentConsumer

log = logging.getLogger(__name__)

# worker id -> the consumer serving it in this process
LOCAL: dict[int, AgentConsumer] = {}


def register(worker_id: int, consumer: AgentConsumer) -> AgentConsumer | None:
    """This consumer serves the worker now; returns the one it replaced, if any."""
    previous = LOCAL.get(worker_id)
    LOCAL[worker_id] = consumer
    return previous if previous is not consumer else None


def unregister(worker_id: int, consumer: AgentConsumer) -> None:
    if LOCAL.get(worker_id) is consumer:
        del LOCAL[worker_id]


def send_frames(frames: list[tuple[int, dict]]) -> None:
    """Hand (worker id, frame) pairs to the connections that serve those workers.

    All frames of one worker travel together, in order, so a burst of
    assignments is one message to its agent.
    """
    by_worker: dict[int, list[dict]] = {}
    for worker_id, frame in frames:
        if worker_id:
            by_worker.setdefault(worker_id, []).append(frame)
    remote = {}
    for worker_id, batch in by_worker.items():
        consumer = LOCAL.get(worker_id)
        if consumer is not None:
            writer.soon(functools.partial(consumer.push, batch), consumer.loop)
        else:
            remote[worker_id] = batch
    if remote:
        _send_remote(remote)


def _send_remote(by_worker: dict[int, list[dict]]) -> None:
    channels = dict(
        Worker.objects.filter(pk__in=by_worker)
        .exclude(channel_name="")
        .values_list("pk", "channel_name")
    )
    layer = get_channel_layer()
    for worker_id, channel in channels.items():
        message = {"type": "agent.frames", "frames": by_worker[worker_id]}
        # A failure is reconciled on the agent's next hello: the database says it all.
        writer.spawn(functools.partial(layer.send, channel, message), f"frames to {channel}")


def send_close(worker_id: int | None, channel: str, code: int) -> None:
    """Ask one agent connection to close (revoked, replaced, reaped)."""
    consumer = LOCAL.get(worker_id) if worker_id else None
    if consumer is not None and (not channel or consumer.channel_name == channel):
        consumer.loop.call_soon_threadsafe(consumer.close_soon, code)
    elif channel:
        message = {"type": "agent.close", "code": code}
        writer.spawn(functools.partial(get_channel_layer().send, channel, message), "a close")
