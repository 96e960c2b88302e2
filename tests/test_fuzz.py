"""Fuzzing the agent websocket and the JSON API: random and mutated input gets
an error answer, never a 500, a dead consumer or a changed database.

Seeded: the seed is printed, and FUZZ_SEED=<n> replays a run.
"""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.urls import URLPattern

from scheduler_site import api_urls
from scheduler_site.asgi import application
from scheduler_site.wire import AGENT_FRAMES
from tasks_app import lifecycle
from tasks_app.models import ApiToken, Attempt, LogChunk, Run, SchedulerState, Task
from tests.engines import in_own_loop
from workers_app import protocol
from workers_app.models import Worker

pytestmark = pytest.mark.django_db(transaction=True)

SEED = int(os.environ.get("FUZZ_SEED", random.SystemRandom().randrange(2**32)))
FRAMES = 10_000
BODIES_PER_METHOD = 12
TIMEOUT = 10


@pytest.fixture
def rng() -> random.Random:
    print(f"fuzz seed: {SEED} (FUZZ_SEED={SEED} replays it)")
    return random.Random(SEED)


def snapshot() -> dict:
    """Every row the fuzzed input could touch (the worker's liveness aside)."""
    return {
        "tasks": list(Task.objects.order_by("pk").values()),
        "runs": list(Run.objects.order_by("pk").values()),
        "attempts": list(Attempt.objects.order_by("pk").values()),
        "logs": LogChunk.objects.count(),
        "workers": list(
            Worker.objects.order_by("pk").values(
                "pk", "name", "state", "capacity", "labels", "drain_requested", "hostname"
            )
        ),
        "paused": SchedulerState.current().paused,
        "tokens": list(ApiToken.objects.order_by("pk").values("pk", "revoked_at")),
    }


# --- values ----------------------------------------------------------------------

WEIRD_STRINGS = ["", "\x00", "\ud800", "é" * 50, "\u202e", "a" * 70_000, "0", "-1", "null", "🙂"]
WEIRD_NUMBERS = [0, -1, 1, 2**31, 2**63, 10**400, -(10**30), 1.5, -0.0, 1e308, 2**53 + 1]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice(WEIRD_NUMBERS)
    if kind == 3:
        return rng.randint(-5, 10**6)
    if kind == 4:
        return rng.choice(WEIRD_STRINGS)
    if kind == 5:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        keys = ["type", "attempt", "task", "count", "runs", "env", "args", "name", "x"]
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"type": rng.choice(list(AGENT_FRAMES))}


def valid_frame(kind: str, attempt: int) -> dict:
    """A well-formed frame of each kind the agent sends."""
    frames = {
        "hello": {"type": "hello", "protocol": 1, "capacity": 2, "running": []},
        "accepted": {"type": "accepted", "attempt": attempt},
        "rejected": {"type": "rejected", "attempt": attempt, "reason": "busy"},
        "started": {"type": "started", "attempt": attempt, "pid": 42, "started_at": 1.7e9},
        "log": {"type": "log", "attempt": attempt, "seq": 1, "stream": "stdout", "data": "hi"},
        "finished": {
            "type": "finished",
            "attempt": attempt,
            "status": "succeeded",
            "exit_code": 0,
            "started_at": 1.7e9,
            "finished_at": 1.7e9,
            "output_bytes": 2,
            "last_seq": 1,
        },
        "heartbeat": {"type": "heartbeat", "running": [attempt]},
    }
    return frames[kind]


def mutated(rng: random.Random, frame: dict) -> dict:
    frame = copy.deepcopy(frame)
    for _ in range(rng.randint(1, 3)):
        keys = list(frame)
        action = rng.randrange(5)
        if action == 0 and keys:  # a field missing
            frame.pop(rng.choice(keys))
        elif action == 1 and keys:  # a field of another type or value
            frame[rng.choice(keys)] = random_value(rng)
        elif action == 2:  # an extra field
            frame[rng.choice(["extra", "\x00", "type2", "é"])] = random_value(rng)
        elif action == 3:  # another type
            frame["type"] = rng.choice([*AGENT_FRAMES, "welcome", "assign", "", None, 7])
        else:  # an attempt of somebody else, or none
            frame["attempt"] = rng.choice([0, -1, 2**63, 10**30, rng.randint(1, 10**6)])
    return frame


def legitimate_change(item) -> bool:
    """A frame that may rightly change the database even here: a valid hello
    (the worker's capacity, labels) or a heartbeat saying it drains."""
    try:
        frame = protocol.check(item)
    except Exception:
        return False
    return frame["type"] == "hello" or (frame["type"] == "heartbeat" and frame.get("draining"))


def random_message(rng: random.Random, attempt: int) -> str | bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 1:
        return (
            "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(rng.randrange(40)))
            .encode("utf-8", "surrogatepass")
            .decode("utf-8", "replace")
        )
    if kind == 2:
        return rng.choice(["[" * 100_000, "{" * 50_000, '{"a":' * 20_000, "[]", "[1]" * 3, "NaN"])
    if kind == 3:
        return json.dumps(random_value(rng))
    if kind == 4:  # protocol 2: an array of frames
        items = [
            mutated(rng, valid_frame(rng.choice(list(AGENT_FRAMES)), attempt))
            for _ in range(rng.randint(1, 5))
        ]
        items = [i for i in items if not legitimate_change(i)] or [{"type": "x"}]
        return json.dumps(items)
    frame = mutated(rng, valid_frame(rng.choice(list(AGENT_FRAMES)), attempt))
    if legitimate_change(frame):
        frame["type"] = "not-a-type"
    return json.dumps(frame)


# --- the consumer --------------------------------------------------------------------


async def test_random_and_mutated_frames_get_error_frames_and_change_nothing(
    rng, worker, worker_credential, task
):
    # Paused: a run queued here is never assigned, so every frame about its
    # attempt is about somebody else's.
    await database_sync_to_async(SchedulerState.set_paused)(True, by="fuzz")
    run = await database_sync_to_async(lifecycle.trigger_run)(task)
    attempt = await database_sync_to_async(lambda: run.attempts.get().pk)()
    headers = [(b"authorization", f"Bearer {worker_credential}".encode())]
    comm = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    assert (await comm.connect(timeout=TIMEOUT))[0]
    await comm.send_json_to(valid_frame("hello", attempt))
    assert (await comm.receive_json_from(timeout=TIMEOUT))["type"] == "welcome"
    before = await database_sync_to_async(snapshot)()

    codes: dict[str, int] = {}
    sent = 0
    while sent < FRAMES:
        for _ in range(200):
            message = random_message(rng, attempt)
            key = "bytes" if isinstance(message, bytes) else "text"
            # send_input: send_to refuses an empty message, which a peer may send.
            await comm.send_input({"type": "websocket.receive", key: message})
            sent += 1
        # A barrier: answered once everything before it is.
        await comm.send_json_to({"type": "barrier"})
        while True:
            output = await comm.receive_output(timeout=TIMEOUT)
            assert output["type"] == "websocket.send", f"the consumer closed: {output}"
            answer = json.loads(output["text"])
            for frame in answer if isinstance(answer, list) else [answer]:
                # Besides errors: a cancel for an attempt the worker should not
                # run, an ack of a result about one (so the agent's spool drains).
                assert frame["type"] in ("error", "cancel", "ack"), frame
                code = frame.get("code", frame["type"])
                codes[code] = codes.get(code, 0) + 1
            if answer == protocol.error("unknown_type", "unknown frame type 'barrier'"):
                break

    assert "internal_error" not in codes, codes
    after = await database_sync_to_async(snapshot)()
    assert after == before
    # Still alive and serving: a hello is welcomed.
    await comm.send_json_to(valid_frame("hello", attempt))
    assert (await comm.receive_json_from(timeout=TIMEOUT))["type"] == "welcome"
    await comm.disconnect()


# --- the API -------------------------------------------------------------------------


def endpoints(task: Task, run: Run, worker: Worker) -> list[str]:
    """Every endpoint of api_urls, its parameters filled with rows that exist."""
    values = {"pk": run.pk, "index": 0, "action": "drain"}
    paths = []
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        route = str(pattern.pattern)
        if route.startswith("^"):
            paths.append("/api/no-such-thing")
            continue
        if route.startswith("tasks/<int:pk>"):
            route = route.replace("<int:pk>", str(task.pk))
        elif route.startswith("workers/<int:pk>"):
            route = route.replace("<int:pk>", str(worker.pk))
        for name, value in values.items():
            for kind in ("int", "str"):
                route = route.replace(f"<{kind}:{name}>", str(value))
        paths.append("/api/" + route)
    return paths


def random_body(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
    if kind == 1:
        return rng.choice([b"[" * 100_000, b'{"a":' * 30_000, b"\xff\xfe", b"NaN", b"1e999999"])
    if kind == 2:
        return json.dumps(random_value(rng)).encode()
    fields = [
        "name",
        "command",
        "timeout",
        "labels",
        "env",
        "task",
        "count",
        "runs",
        "run_at",
        "retries",
        "cron",
        "enabled",
        "priority",
        "args",
        "cwd",
        "capacity",
    ]
    body = {rng.choice(fields): random_value(rng) for _ in range(rng.randint(1, 5))}
    return json.dumps(body).encode()


def test_random_bodies_to_every_endpoint_get_no_500_and_change_nothing_when_refused(
    rng, api, bob_token, task, worker
):
    run = lifecycle.trigger_run(task)
    paths = endpoints(task, run, worker)
    assert len(paths) == len(api_urls.urlpatterns)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    statuses: dict[int, int] = {}
    for path in paths:
        for method in methods:
            for _ in range(BODIES_PER_METHOD):
                body = random_body(rng)
                before = snapshot()
                response = api.generic(method, path, body, content_type="application/json")
                status = response.status_code
                statuses[status] = statuses.get(status, 0) + 1
                assert status < 500, (method, path, body[:200], response.content[:500])
                if status >= 400:
                    assert snapshot() == before, (method, path, body[:200], status)
                if path.startswith("/api/tasks/") and status in (200, 204) and method == "DELETE":
                    # The task was really deleted: bring one back for the rest.
                    task = Task.objects.create(name=f"again-{task.pk}", command="true")
                    paths = endpoints(task, lifecycle.trigger_run(task), worker)
    print(f"statuses: {sorted(statuses.items())}")


def test_random_bodies_to_the_trigger_consumers_get_no_500_and_change_nothing(rng, bob_token, task):
    """POST /api/tasks/<id>/run and /api/runs under ASGI are Channels consumers."""
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {bob_token}".encode()),
    ]

    async def post(path: str, body: bytes) -> int:
        comm = HttpCommunicator(application, "POST", path, body=body, headers=headers)
        response = await comm.get_response(timeout=TIMEOUT)
        return response["status"]

    for path in (f"/api/tasks/{task.pk}/run", "/api/runs"):
        for _ in range(BODIES_PER_METHOD * 4):
            body = random_body(rng)
            before = snapshot()
            status = in_own_loop(post, path, body)
            assert status < 500, (path, body[:200])
            if status >= 400:
                assert snapshot() == before, (path, body[:200], status)
