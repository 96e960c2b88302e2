"""The protocol's two sides checked against each other.

The vocabulary is defined once (scheduler_site/wire.py) and the agent carries
a verbatim copy. Every frame the agent's core can emit goes through the
master's parser, and every frame the master builds goes through the agent's
checks and its core, which must act on it rather than ignore it.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
from django.utils import timezone

from scheduler_site import wire
from tasks_app import lifecycle
from tasks_app.models import Task
from workers_app import agent, protocol, wirecopy
from workers_app.agent import AgentCore, KillProcess, Send, StartProcess, Welcomed
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def test_the_agent_carries_the_wire_vocabulary_verbatim():
    assert wirecopy.embedded() == wirecopy.original(), (
        "workers_app/agent.py's copy of scheduler_site/wire.py is out of date: run `make wire`"
    )
    # And it is the copy the agent actually uses.
    assert agent.PROTOCOL_VERSION == wire.PROTOCOL_VERSION
    assert agent.AGENT_FRAMES == wire.AGENT_FRAMES
    assert agent.MASTER_FRAMES == wire.MASTER_FRAMES


def _welcome(**overrides) -> dict:
    worker = Worker(pk=7, name="node-1")
    frame = protocol.welcome(
        worker,
        protocol=wire.PROTOCOL_VERSION,
        heartbeat_s=5.0,
        log_limit_bytes=64,
        max_frame_bytes=1024 * 1024,
        lost_after_s=15.0,
        self_fence=True,
    )
    return {**frame, **overrides}


def _assign(attempt_id: int, **task_fields) -> dict:
    task = Task(name="answer", command='python3 -c "print(6*7)"', **task_fields)
    return protocol.assign(attempt_id, 100 + attempt_id, task.name, task.definition())


def _sent(outputs) -> list[dict]:
    return [out.frame for out in outputs if isinstance(out, Send)]


def _emitted_by_the_agent() -> list[dict]:
    """Every kind of frame the core emits, from one scripted life of an agent."""
    core = AgentCore(name="node-1", hostname="host-1", capacity=2, labels=["gpu"])
    frames = _sent(core.connection_opened())  # hello
    frames += _sent(core.receive(json.dumps(_welcome())))
    frames += _sent(core.receive(json.dumps(_assign(1))))  # accepted
    frames += _sent(core.process_started(1, 4242, 1_800_000_000.5))  # started
    frames += _sent(core.output(1, "stdout", b"hello \xc3\xa9\n"))
    frames += _sent(core.output(1, "stderr", b"x" * 100))  # past the 64-byte cap
    frames += _sent(core.flush_logs())  # log
    frames += _sent(core.heartbeat())
    frames += _sent(core.process_exited(1, 3, 1_800_000_002.0))  # finished, failed
    frames += _sent(core.receive(json.dumps(_assign(2, shell=True))))
    frames += _sent(core.receive(json.dumps(_assign(3))))
    frames += _sent(core.receive(json.dumps(_assign(4))))  # rejected: at capacity
    frames += _sent(core.process_failed_to_start(3, "cannot start: no such file", 1_800_000_003.0))
    core.process_started(2, 4243, 1_800_000_004.0)
    core.deadline_passed(2)
    frames += _sent(core.process_exited(2, -15, 1_800_000_009.0))  # finished, timed_out
    frames += _sent(core.begin_shutdown(30.0))  # heartbeat, draining
    return frames


def test_every_frame_the_agent_emits_passes_the_masters_parser():
    frames = _emitted_by_the_agent()

    kinds = {frame["type"] for frame in frames}
    assert kinds == set(wire.AGENT_FRAMES), "the script should make every kind of agent frame"
    for frame in frames:
        assert protocol.check(copy.deepcopy(frame)) == frame
    # Batched the way protocol 2 carries them, the master reads them back in order.
    message = json.dumps(frames)
    assert protocol.parse_message(message, wire.MAX_FRAME_BYTES) == (frames, [])


def _built_by_the_master() -> list[dict]:
    run = lifecycle.trigger_run(
        Task.objects.create(
            name="full",
            command="printf %s",
            env={"A": "1"},
            working_dir="/tmp",
            timeout=30,
        )
    )
    attempt = run.attempts.get()
    return [
        _welcome(),
        _welcome(fence_after_s=None),
        protocol.assign(attempt.pk, run.pk, run.task_name, run.definition),
        _assign(9, shell=True),
        protocol.cancel(1),
        protocol.ack(1),
        protocol.log_ack(1, 0),
        protocol.drain(),
        protocol.resume(),
        protocol.error("unknown_attempt", "no such attempt is assigned to you", attempt=1),
        protocol.error("malformed", "frame must be a JSON object"),
    ]


def test_every_frame_the_master_builds_passes_the_agents_checks(caplog):
    frames = _built_by_the_master()

    assert {frame["type"] for frame in frames} == set(wire.MASTER_FRAMES)
    for frame in frames:
        assert agent.field_problem(frame, agent.MASTER_FRAMES) is None, frame
    # And the agent's core acts on each one rather than ignoring it.
    core = AgentCore(name="node-1", hostname="host-1", capacity=4)
    core.connection_opened()
    caplog.set_level(logging.INFO, logger="scheduler_agent")
    outputs = []
    for text in protocol.encode(frames, wire.PROTOCOL_VERSION, wire.MAX_FRAME_BYTES):
        outputs += core.receive(text)
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert any(isinstance(out, Welcomed) for out in outputs)
    started = [out for out in outputs if isinstance(out, StartProcess)]
    assert [out.argv for out in started] == [
        ["printf", "%s"],
        ["/bin/sh", "-c", 'python3 -c "print(6*7)"'],
    ]
    assert started[0].env["A"] == "1" and started[0].cwd == "/tmp" and started[0].timeout == 30
    assert core.draining is False  # drained, then resumed


def test_the_master_splits_a_batch_so_no_message_is_over_the_limit():
    frames = [protocol.log_ack(attempt, 5) for attempt in range(1, 400)]

    messages = list(protocol.encode(frames, 2, 1000))

    assert len(messages) > 1
    assert all(len(text) <= 1000 for text in messages)
    decoded = [f for text in messages for f in _as_list(json.loads(text))]
    assert decoded == frames
    # A protocol 1 agent gets one frame per message.
    assert [json.loads(t) for t in protocol.encode(frames[:3], 1, 1000)] == frames[:3]


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_a_message_mixing_good_and_bad_frames_keeps_the_good_ones():
    good = {"type": "accepted", "attempt": 5}
    frames, errors = protocol.parse_message(
        json.dumps([good, {"type": "reboot"}, {"type": "log", "attempt": 1}]), 10_000
    )

    assert frames == [good]
    assert errors == [
        {"type": "error", "code": "unknown_type", "message": "unknown frame type 'reboot'"},
        {"type": "error", "code": "malformed", "message": "log: missing field 'seq'"},
    ]


def test_the_agent_kills_on_cancel_and_answers_a_cancel_of_nothing_with_nothing():
    core = AgentCore(name="n", hostname="h", capacity=1)
    core.connection_opened()
    core.receive(json.dumps(_welcome()))
    core.receive(json.dumps(_assign(1)))
    core.process_started(1, 99, timezone.now().timestamp())

    assert core.receive(json.dumps(protocol.cancel(1))) == [KillProcess(1)]
    assert core.receive(json.dumps(protocol.cancel(2))) == []
