"""Frames that arrive together are applied together, and nothing gives.

Agent sockets through the real ASGI app (WebsocketCommunicator), speaking
protocol 2 (a message may be an array of frames). The writer applies what
accumulated from all of them in one transaction; these tests check the
guarantees under bursts: each result stored once, every run final, no
attempt on two agents, never more than an agent's capacity.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db.models import Count

from scheduler_site.asgi import application
from tasks_app import lifecycle, tokens
from tasks_app.lifecycle import TriggerRequest
from tasks_app.models import Attempt, Run, Task
from tasks_app.writer import writer
from workers_app.models import Worker

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


@database_sync_to_async
def make_workers(count: int, capacity: int) -> list[tuple[Worker, str]]:
    made = []
    for number in range(count):
        credential = f"wkr_batch-{number}"
        worker = Worker.objects.create(
            name=f"node-{number}", capacity=capacity, credential_hash=tokens.digest(credential)
        )
        made.append((worker, credential))
    return made


@database_sync_to_async
def trigger(task: Task, count: int) -> list[int]:
    [runs] = lifecycle.trigger_runs([TriggerRequest(task.pk, count=count)])
    return [run.pk for run in runs]


@database_sync_to_async
def make_task() -> Task:
    return Task.objects.create(name="noop", command="true")


class SimAgent:
    """A test's stand-in for an agent: records what it is given, answers on cue."""

    def __init__(self, worker: Worker, credential: str, capacity: int) -> None:
        self.worker, self.credential, self.capacity = worker, credential, capacity
        self.comm: WebsocketCommunicator | None = None
        self.outstanding: set[int] = set()  # assigned here and not finished yet
        self.acked: list[int] = []
        self.cancelled: list[int] = []
        self.errors: list[dict] = []
        self.most_at_once = 0

    async def connect(self, running: list[int] = ()) -> None:
        self.comm = WebsocketCommunicator(
            application,
            "/ws/agent/",
            headers=[(b"authorization", b"Bearer " + self.credential.encode())],
        )
        connected, _ = await self.comm.connect(timeout=TIMEOUT)
        assert connected
        hello = {
            "type": "hello",
            "protocol": 2,
            "capacity": self.capacity,
            "labels": [],
            "running": list(running),
        }
        await self.comm.send_json_to(hello)
        welcome = await self.next_frames()
        assert welcome[0]["type"] == "welcome"
        self.take(welcome[1:])

    async def next_frames(self, timeout: float = TIMEOUT) -> list[dict]:
        message = json.loads(await self.comm.receive_from(timeout=timeout))
        return message if isinstance(message, list) else [message]

    def take(self, frames: list[dict]) -> list[int]:
        """Record frames from the master; the attempts newly assigned here."""
        new = []
        for frame in frames:
            if frame["type"] == "assign":
                if frame["attempt"] not in self.outstanding:  # a resend repeats itself
                    self.outstanding.add(frame["attempt"])
                    new.append(frame["attempt"])
                self.most_at_once = max(self.most_at_once, len(self.outstanding))
            elif frame["type"] == "ack":
                self.acked.append(frame["attempt"])
            elif frame["type"] == "cancel":
                self.cancelled.append(frame["attempt"])
            elif frame["type"] == "error":
                self.errors.append(frame)
        return new

    async def pump(self, quiet: float = 0.3) -> list[int]:
        """Take frames until the master is quiet; the attempts newly assigned."""
        new = []
        # (A receive that times out would cancel the application: ask first.)
        while not await self.comm.receive_nothing(timeout=quiet):
            new += self.take(await self.next_frames())
        return new

    async def send(self, frames: list[dict]) -> None:
        await self.comm.send_to(text_data=json.dumps(frames))


def started(attempt_id: int) -> list[dict]:
    return [
        {"type": "accepted", "attempt": attempt_id},
        {"type": "started", "attempt": attempt_id, "pid": 1, "started_at": 1_800_000_000.0},
    ]


def finished(attempt_id: int, exit_code: int = 0) -> dict:
    return {
        "type": "finished",
        "attempt": attempt_id,
        "status": "succeeded" if exit_code == 0 else "failed",
        "exit_code": exit_code,
        "reason": "" if exit_code == 0 else f"exit code {exit_code}",
        "started_at": 1_800_000_000.0,
        "finished_at": 1_800_000_001.0,
    }


async def test_a_burst_of_500_results_from_5_agents_is_stored_once_and_finishes_every_run():
    task = await make_task()
    agents = [SimAgent(w, c, 100) for w, c in await make_workers(5, capacity=100)]
    for sim in agents:
        await sim.connect()
    await trigger(task, 500)
    for sim in agents:
        while len(sim.outstanding) < 100:
            sim.take(await sim.next_frames())
        await sim.send([frame for a in sorted(sim.outstanding) for frame in started(a)])
    batches_before = writer.batches

    # One message per result, all five agents at once, each with 20 replays
    # that claim another exit code: the first report is the one that counts.
    for sim in agents:
        for attempt_id in sorted(sim.outstanding):
            await sim.comm.send_to(text_data=json.dumps(finished(attempt_id)))
        for attempt_id in sorted(sim.outstanding)[:20]:
            await sim.comm.send_to(text_data=json.dumps(finished(attempt_id, exit_code=7)))
    for sim in agents:
        while len(sim.acked) < 120:
            sim.take(await sim.next_frames())

    for sim in agents:
        assert sorted(sim.acked) == sorted([*sim.outstanding, *sorted(sim.outstanding)[:20]])
        assert sim.errors == []
    statuses = await database_sync_to_async(
        lambda: sorted(set(Attempt.objects.values_list("status", "exit_code", "try_number")))
    )()
    assert statuses == [("succeeded", 0, 1)]
    assert await database_sync_to_async(Attempt.objects.count)() == 500
    runs = await database_sync_to_async(lambda: set(Run.objects.values_list("status", flat=True)))()
    assert runs == {"succeeded"}
    # 600 messages, applied together in a fraction of that many transactions.
    assert writer.batches - batches_before < 600 / 3
    for sim in agents:
        await sim.comm.disconnect()


async def test_a_burst_of_triggers_while_an_agent_reconnects_assigns_nothing_twice():
    task = await make_task()
    (w1, c1), (w2, c2) = await make_workers(2, capacity=3)
    agents = [SimAgent(w1, c1, 3), SimAgent(w2, c2, 3)]
    for sim in agents:
        await sim.connect()
    started_on: dict[int, str] = {}  # attempt -> the worker that started it
    run_ids: list[int] = []

    async def work(sim: SimAgent, finish: int) -> None:
        """Start what is new, finish up to `finish` of what runs."""
        for attempt_id in await sim.pump():
            assert started_on.setdefault(attempt_id, sim.worker.name) == sim.worker.name
            await sim.send(started(attempt_id))
        done = sorted(sim.outstanding)[:finish]
        if done:
            sim.outstanding -= set(done)
            await sim.send([finished(a) for a in done])

    most_in_db = 0

    async def count_active() -> None:
        nonlocal most_in_db
        counts = await database_sync_to_async(
            lambda: list(
                Attempt.objects.filter(status__in=Attempt.ACTIVE)
                .values("worker")
                .annotate(n=Count("id"))
                .values_list("n", flat=True)
            )
        )()
        most_in_db = max([most_in_db, *counts])

    for burst in range(6):
        run_ids += await trigger(task, 10)
        if burst == 2:
            # The first agent's socket drops right after it reported starts, and
            # before they are applied; a burst comes in; it reconnects (a new
            # socket, the same worker) and its hello says what runs.
            first = agents[0]
            await first.pump()
            fresh = [a for a in sorted(first.outstanding) if a not in started_on]
            for attempt_id in fresh:
                started_on[attempt_id] = first.worker.name
            await first.send([frame for a in fresh for frame in started(a)])
            await first.comm.disconnect()
            run_ids += await trigger(task, 10)
            await first.connect(running=sorted(first.outstanding))
        for sim in agents:
            await work(sim, finish=2)
        await count_active()

    async def all_final() -> bool:
        return await database_sync_to_async(
            lambda: not Run.objects.filter(pk__in=run_ids).exclude(status__in=Run.FINAL).exists()
        )()

    for _ in range(100):
        if await all_final():
            break
        for sim in agents:
            await work(sim, finish=3)
        await count_active()
    assert await all_final()

    assert len(run_ids) == 70
    runs = await database_sync_to_async(
        lambda: set(Run.objects.filter(pk__in=run_ids).values_list("status", flat=True))
    )()
    assert runs == {"succeeded"}
    # Never more than its capacity at once on an agent, no attempt on two of them,
    # and nothing was retried (nothing was lost).
    assert [sim.most_at_once <= 3 for sim in agents] == [True, True]
    assert most_in_db <= 3
    assert len(started_on) == 70
    assert await database_sync_to_async(Attempt.objects.filter(try_number__gt=1).count)() == 0
    for sim in agents:
        assert sim.errors == []
        await sim.comm.disconnect()


async def test_an_agent_held_back_by_a_slow_writer_still_counts_as_heard_from(monkeypatch):
    from tasks_app.writer import _Kind
    from workers_app import consumers, liveness, reports

    [(worker, credential)] = await make_workers(1, capacity=1)
    sim = SimAgent(worker, credential, 1)
    await sim.connect()
    # The writer stuck on a batch (a slow disk, a long lock): this agent's
    # messages pile up until the consumer stops reading its socket.
    gate = threading.Event()

    def stuck(messages):
        gate.wait(20)
        return reports.apply_messages(messages)

    monkeypatch.setitem(writer._kinds, "agent", _Kind(stuck, 10))
    for attempt_id in range(1, consumers.MAX_INFLIGHT + 10):
        await sim.comm.send_to(text_data=json.dumps({"type": "accepted", "attempt": attempt_id}))
    await asyncio.sleep(0.1)
    stalled_at = time.time()

    try:
        deadline = time.monotonic() + 5
        while liveness.SEEN[worker.pk] < stalled_at + 0.5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Not one of its frames was read for half a second, yet it counts as heard from.
        assert liveness.SEEN[worker.pk] >= stalled_at + 0.5
    finally:
        gate.set()
    # Then every one of them is answered (none of those attempts is its own).
    while len(sim.cancelled) < consumers.MAX_INFLIGHT + 9:
        sim.take(await sim.next_frames())
    assert sorted(sim.cancelled) == list(range(1, consumers.MAX_INFLIGHT + 10))
    await sim.comm.disconnect()
