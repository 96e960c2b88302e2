"""The agent websocket, through the real ASGI app and its credential middleware.

Each test holds a conversation with exact frames and ends with nothing left
unanswered. Consumers run database code in threads, hence transactional tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.utils import timezone

from scheduler_site.asgi import application
from tasks_app import lifecycle, logs, tokens
from tasks_app.models import Attempt, LogChunk, Run, Task
from workers_app import delivery, dispatch, liveness, registration, reports
from workers_app.models import Worker

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5  # generous: a frame that is coming arrives in milliseconds
ARGV = ["python3", "-c", "print(6*7)"]
OTHER_CREDENTIAL = "wkr_test-credential-of-the-other-worker"

# --- helpers -------------------------------------------------------------------


def hello_frame(running: list[int] | None = None, **overrides) -> dict:
    return {
        "type": "hello",
        "protocol": 1,
        "agent_version": "1.4.0",
        "hostname": "box-a.example",
        "capacity": 2,
        "labels": ["linux"],
        "running": running or [],
        **overrides,
    }


def welcome_for(worker: Worker) -> dict:
    return {
        "type": "welcome",
        "protocol": 1,
        "worker_id": worker.pk,
        "name": worker.name,
        "heartbeat_s": django_settings.SCHEDULER_HEARTBEAT_S,
        "log_limit_bytes": django_settings.SCHEDULER_LOG_LIMIT_BYTES,
        "max_frame_bytes": django_settings.SCHEDULER_MAX_FRAME_BYTES,
        "lost_after_s": 15.0,
        "fence_after_s": 7.5,
    }


def assign_for(attempt: Attempt, task_name: str = "answer") -> dict:
    return {
        "type": "assign",
        "attempt": attempt.pk,
        "run": attempt.run_id,
        "task_name": task_name,
        "argv": ARGV,
        "shell": None,
        "env": {},
        "cwd": None,
        "timeout": None,
        "shard_index": 0,
        "shard_count": 1,
    }


def finished_frame(attempt: Attempt, exit_code: int = 0, **overrides) -> dict:
    now = timezone.now().timestamp()
    return {
        "type": "finished",
        "attempt": attempt.pk,
        "status": "succeeded" if exit_code == 0 else "failed",
        "exit_code": exit_code,
        "reason": "" if exit_code == 0 else f"exit code {exit_code}",
        # Real times: after the assignment, no later than the master's now.
        "started_at": now,
        "finished_at": now,
        "output_bytes": 3,
        **overrides,
    }


def unknown_attempt(attempt_id: int, message: str = "no such attempt is assigned to you") -> dict:
    return {"type": "error", "code": "unknown_attempt", "message": message, "attempt": attempt_id}


async def barrier(comm: WebsocketCommunicator) -> None:
    """Wait until the consumer has handled every frame sent so far.

    Frames are handled one at a time, in order: once the answer to this one
    arrives, everything before it is in the database.
    """
    await comm.send_json_to({"type": "barrier"})
    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "unknown_type",
        "message": "unknown frame type 'barrier'",
    }


@database_sync_to_async
def refreshed(obj):
    obj.refresh_from_db()
    return obj


@database_sync_to_async
def heard_from(worker: Worker) -> Worker:
    """The worker as stored once the heartbeats noted so far are written (the
    service's tick does this every second)."""
    liveness.flush_heartbeats()
    worker.refresh_from_db()
    return worker


@database_sync_to_async
def trigger(task: Task) -> Attempt:
    """Trigger a run the way the dashboard does (dispatch runs after commit)."""
    run = lifecycle.trigger_run(task)
    return Attempt.objects.select_related("run").get(run=run)


@database_sync_to_async
def place(task: Task, worker: Worker, *, started: bool) -> Attempt:
    """An attempt already assigned to (and maybe running on) a worker."""
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    if started:
        assert lifecycle.mark_started(worker.pk, attempt.pk, None, 4242)
    attempt.refresh_from_db()
    return attempt


@database_sync_to_async
def run_of(attempt: Attempt) -> Run:
    return Run.objects.get(pk=attempt.run_id)


@database_sync_to_async
def make_worker(name: str, credential: str, labels: list[str] | None = None) -> Worker:
    return Worker.objects.create(
        name=name,
        capacity=2,
        labels=labels if labels is not None else ["linux"],
        credential_hash=tokens.digest(credential),
    )


@database_sync_to_async
def chunks_of(attempt: Attempt) -> list[tuple[int, str, str]]:
    return list(attempt.log_chunks.order_by("seq").values_list("seq", "stream", "data"))


@database_sync_to_async
def output_of(attempt: Attempt) -> dict[str, str]:
    attempt.refresh_from_db()
    return logs.output_of(attempt)


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def scheduler_settings(settings) -> None:
    # Known intervals, so that the welcome frame can be spelled out exactly.
    settings.SCHEDULER_HEARTBEAT_S = 5.0
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    settings.SCHEDULER_SELF_FENCE = True


@pytest.fixture(autouse=True)
async def empty_channel_layer() -> None:
    # The in-memory layer outlives a test; groups of earlier tests must not leak in.
    await get_channel_layer().flush()


@pytest.fixture
async def connect() -> AsyncIterator[Callable]:
    """Open agent sockets; every one still open is closed at the end of the test."""
    opened: list[WebsocketCommunicator] = []

    async def open_socket(credential: str | None, *, expect_accept: bool = True):
        headers = []
        if credential is not None:
            headers = [(b"authorization", b"Bearer " + credential.encode())]
        comm = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
        opened.append(comm)
        connected, code = await comm.connect(timeout=TIMEOUT)
        if expect_accept:
            assert connected, f"handshake refused with {code}"
            return comm
        return connected, code

    yield open_socket
    for comm in opened:
        if not comm.future.done():
            await comm.disconnect(timeout=TIMEOUT)


@pytest.fixture
async def agent(connect, worker, worker_credential) -> WebsocketCommunicator:
    """The registered worker, connected and welcomed."""
    comm = await connect(worker_credential)
    await comm.send_json_to(hello_frame())
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    # The consumer dispatches after its welcome: let it finish before the test's
    # fixtures write from the main thread (the in-memory test database takes
    # table locks that do not wait).
    await barrier(comm)
    return comm


@pytest.fixture
def linux_task(task) -> Task:
    task.labels = ["linux"]
    task.save()
    return task


# --- authentication ------------------------------------------------------------


async def test_it_refuses_a_wrong_credential(connect, worker):
    assert await connect("wkr_not-the-credential", expect_accept=False) == (False, 4401)


async def test_it_refuses_a_handshake_without_credential(connect, worker):
    assert await connect(None, expect_accept=False) == (False, 4401)


async def test_it_refuses_a_revoked_worker(connect, worker, worker_credential):
    await database_sync_to_async(registration.revoke)(worker)

    assert await connect(worker_credential, expect_accept=False) == (False, 4401)
    worker = await refreshed(worker)
    assert worker.state == Worker.State.DISABLED
    assert worker.channel_name == ""


@pytest.mark.parametrize("origin", [b"https://evil.example", b"http://127.0.0.1:8000", b"null"])
async def test_it_refuses_a_handshake_from_a_browser(worker, worker_credential, origin):
    """Agents send no Origin; any browser page does, even one of ours."""
    headers = [
        (b"authorization", b"Bearer " + worker_credential.encode()),
        (b"origin", origin),
    ]
    comm = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert not connected
    worker = await refreshed(worker)
    assert worker.state == Worker.State.OFFLINE
    assert worker.channel_name == ""


# --- hello ---------------------------------------------------------------------


async def test_it_welcomes_a_worker_and_brings_it_online(connect, worker, worker_credential):
    before = timezone.now()
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(capacity=3, labels=["linux", "gpu"]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "welcome",
        "protocol": 1,
        "worker_id": worker.pk,
        "name": "node-1",
        "heartbeat_s": django_settings.SCHEDULER_HEARTBEAT_S,
        "log_limit_bytes": django_settings.SCHEDULER_LOG_LIMIT_BYTES,
        "max_frame_bytes": django_settings.SCHEDULER_MAX_FRAME_BYTES,
        "lost_after_s": 15.0,
        # The agent kills its commands before the master may retry them elsewhere.
        "fence_after_s": 7.5,
    }
    worker = await refreshed(worker)
    assert worker.state == Worker.State.ONLINE
    assert worker.hostname == "box-a.example"
    # What it asks for is noted; the labels and capacity decided for it stay.
    assert (worker.requested_capacity, worker.requested_labels) == (3, ["linux", "gpu"])
    assert (worker.capacity, worker.labels) == (2, ["linux"])
    assert worker.agent_version == "1.4.0"
    assert worker.last_heartbeat >= before
    assert worker.connected_at >= before
    assert worker.channel_name
    assert await comm.receive_nothing()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "heartbeat"},
        {"type": "started", "attempt": 1, "pid": 10},
        {"type": "finished", "attempt": 1, "status": "succeeded", "exit_code": 0},
    ],
    ids=["heartbeat", "started", "finished"],
)
async def test_it_wants_hello_before_any_other_frame(connect, worker, worker_credential, frame):
    comm = await connect(worker_credential)

    await comm.send_json_to(frame)

    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "hello_first",
        "message": "send hello before any other frame",
    }
    assert await comm.receive_nothing()
    worker = await refreshed(worker)
    assert worker.state == Worker.State.OFFLINE
    assert worker.last_heartbeat is None
    assert worker.channel_name == ""


async def test_it_refuses_an_unsupported_protocol(connect, worker, worker_credential):
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(protocol=3))

    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "unsupported_protocol",
        "message": "protocol 3 is not supported; this master speaks 1 and 2",
    }
    # The refused hello did not count as one.
    await comm.send_json_to({"type": "heartbeat"})
    assert (await comm.receive_json_from(timeout=TIMEOUT))["code"] == "hello_first"
    assert await comm.receive_nothing()
    worker = await refreshed(worker)
    assert worker.state == Worker.State.OFFLINE
    assert worker.hostname == "node-1.example"


# --- bad frames ----------------------------------------------------------------


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as exc:
        return f"frame is not valid JSON: {exc}"
    raise AssertionError(f"{text!r} is valid JSON")


BAD_FRAMES = [
    pytest.param("{not json", "malformed", _json_error("{not json"), id="malformed-json"),
    pytest.param("[1]", "malformed", "frame must be a JSON object", id="list-of-a-number"),
    pytest.param("[]", "malformed", "a message carries 1 to 1000 frames, not 0", id="empty-list"),
    pytest.param(
        "[" * 50_000 + "]" * 50_000, "malformed", "frame is nested too deeply", id="nested"
    ),
    pytest.param(
        json.dumps({"type": "reboot"}), "unknown_type", "unknown frame type 'reboot'", id="unknown"
    ),
    pytest.param(
        json.dumps({"attempt": 1}), "unknown_type", "unknown frame type None", id="no-type"
    ),
    pytest.param(
        json.dumps({"type": "log", "attempt": 1, "seq": 0, "stream": "stdout"}),
        "malformed",
        "log: missing field 'data'",
        id="missing-field",
    ),
    pytest.param(
        json.dumps({"type": "started", "attempt": "1"}),
        "malformed",
        "started: field 'attempt' has the wrong type",
        id="attempt-as-string",
    ),
    pytest.param(
        json.dumps(hello_frame(capacity=True, hostname="evil.example")),
        "malformed",
        "hello: field 'capacity' has the wrong type",
        id="capacity-true",
    ),
    pytest.param(
        json.dumps(hello_frame(capacity=0, hostname="evil.example")),
        "malformed",
        "hello: capacity must be between 1 and 1024",
        id="capacity-zero",
    ),
    pytest.param(
        json.dumps({"type": "log", "attempt": 1, "seq": 0, "stream": "video", "data": "x"}),
        "malformed",
        "log: stream must be stdout or stderr",
        id="log-stream-video",
    ),
    pytest.param(
        json.dumps({"type": "finished", "attempt": 1, "status": "great", "exit_code": 0}),
        "malformed",
        "finished: unknown status 'great'",
        id="finished-status",
    ),
    pytest.param(
        json.dumps({"type": "heartbeat", "running": ["1"]}),
        "malformed",
        "heartbeat: running must be a list of attempt ids",
        id="running-of-strings",
    ),
    pytest.param(
        b"\x00\x01binary",
        "binary_frame",
        "binary frames are not part of the protocol; send JSON text",
        id="bytes",
    ),
]


@pytest.mark.parametrize(("raw", "code", "message"), BAD_FRAMES)
async def test_it_answers_a_bad_frame_with_an_error_and_keeps_working(
    agent, worker, raw, code, message
):
    before = (await refreshed(worker)).last_heartbeat

    if isinstance(raw, bytes):
        await agent.send_to(bytes_data=raw)
    else:
        await agent.send_to(text_data=raw)

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": code,
        "message": message,
    }
    # Nothing changed, and the consumer still serves the next frame.
    worker = await refreshed(worker)
    assert (worker.hostname, worker.capacity) == ("box-a.example", 2)
    await agent.send_json_to({"type": "heartbeat", "running": []})
    await barrier(agent)
    assert (await heard_from(worker)).last_heartbeat > before
    assert await agent.receive_nothing()


async def test_it_refuses_a_frame_over_the_size_limit(settings, agent, worker):
    settings.SCHEDULER_MAX_FRAME_BYTES = 200
    before = (await refreshed(worker)).last_heartbeat
    frame = json.dumps({"type": "heartbeat", "running": [], "padding": "x" * 300})

    await agent.send_to(text_data=frame)

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "too_large",
        "message": f"frame of {len(frame)} bytes exceeds the limit of 200",
    }
    assert (await refreshed(worker)).last_heartbeat == before
    await agent.send_json_to({"type": "heartbeat", "running": []})
    await barrier(agent)
    assert (await heard_from(worker)).last_heartbeat > before
    assert await agent.receive_nothing()


# --- dispatch ------------------------------------------------------------------


async def test_it_sends_an_assign_frame_for_a_queued_run(agent, worker, linux_task):
    attempt = await trigger(linux_task)

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "assign",
        "attempt": attempt.pk,
        "run": attempt.run_id,
        "task_name": "answer",
        "argv": ["python3", "-c", "print(6*7)"],
        "shell": None,
        "env": {},
        "cwd": None,
        "timeout": None,
        "shard_index": 0,
        "shard_count": 1,
    }
    attempt = await refreshed(attempt)
    assert attempt.status == Attempt.Status.ASSIGNED
    assert attempt.worker_id == worker.pk
    assert attempt.worker_name == "node-1"
    assert attempt.assigned_at is not None
    assert await agent.receive_nothing()


async def test_it_leaves_a_run_queued_when_no_worker_has_its_labels(agent, task):
    task.labels = ["linux", "gpu"]
    await database_sync_to_async(task.save)()

    attempt = await trigger(task)

    assert await agent.receive_nothing()
    attempt = await refreshed(attempt)
    assert attempt.status == Attempt.Status.QUEUED
    assert attempt.worker_id is None


async def test_it_never_assigns_more_than_the_agents_capacity(agent, linux_task):
    first = await trigger(linux_task)
    second = await trigger(linux_task)
    third = await trigger(linux_task)

    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(first)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(second)
    assert await agent.receive_nothing()
    assert (await refreshed(third)).status == Attempt.Status.QUEUED

    await agent.send_json_to(finished_frame(first))

    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": first.pk}
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(third)
    assert await agent.receive_nothing()
    third = await refreshed(third)
    assert third.status == Attempt.Status.ASSIGNED
    assert third.worker_id == (await refreshed(first)).worker_id


# --- reports about attempts ----------------------------------------------------


async def test_it_marks_an_attempt_running_when_it_starts(agent, worker, linux_task):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    started_at = timezone.now().timestamp()

    await agent.send_json_to({"type": "accepted", "attempt": attempt.pk})
    await agent.send_json_to(
        {"type": "started", "attempt": attempt.pk, "pid": 31337, "started_at": started_at}
    )
    await barrier(agent)

    attempt = await refreshed(attempt)
    assert attempt.status == Attempt.Status.RUNNING
    assert attempt.pid == 31337
    assert attempt.started_at.timestamp() == pytest.approx(started_at, abs=1e-3)
    run = await run_of(attempt)
    assert run.status == Run.Status.RUNNING
    assert run.started_at == attempt.started_at
    assert await agent.receive_nothing()


async def test_it_records_that_the_agent_accepted_an_assignment(agent, linux_task):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)

    await agent.send_json_to({"type": "accepted", "attempt": attempt.pk})
    await barrier(agent)

    attempt = await refreshed(attempt)
    assert attempt.status == Attempt.Status.ASSIGNED
    assert attempt.accepted_at is not None
    assert await agent.receive_nothing()


async def test_it_cancels_an_accepted_attempt_that_is_no_longer_the_agents(
    connect, worker, worker_credential, task
):
    other = await make_worker("node-2", OTHER_CREDENTIAL)
    theirs = await place(task, other, started=False)
    comm = await connect(worker_credential)
    await comm.send_json_to(hello_frame())
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)

    await comm.send_json_to({"type": "accepted", "attempt": theirs.pk})

    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "cancel", "attempt": theirs.pk}
    assert await comm.receive_nothing()
    theirs = await refreshed(theirs)
    assert (theirs.status, theirs.worker_id, theirs.accepted_at) == ("assigned", other.pk, None)


@pytest.mark.parametrize(
    ("exit_code", "status", "reason", "run_status"),
    [(0, "succeeded", "", Run.Status.SUCCEEDED), (3, "failed", "exit code 3", Run.Status.FAILED)],
)
async def test_it_stores_batched_output_and_the_result_then_acks(
    agent, linux_task, exit_code, status, reason, run_status
):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    frame = finished_frame(attempt, exit_code, output_bytes=28)
    # One message of protocol 2, as an agent batches what is ready; the output
    # out of order on purpose: storage orders by seq, not by arrival.
    batch = [
        {"type": "started", "attempt": attempt.pk, "pid": 99, "started_at": frame["started_at"]},
        *(
            {"type": "log", "attempt": attempt.pk, "seq": seq, "stream": stream, "data": data}
            for seq, stream, data in [
                (0, "stdout", "line one\n"),
                (2, "stdout", "line three\n"),
                (1, "stderr", "warning\n"),
            ]
        ),
        frame,
    ]

    await agent.send_to(text_data=json.dumps(batch))

    # The output is stored before the result, and acknowledged up to its last seq.
    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "log_ack",
        "attempt": attempt.pk,
        "seq": 2,
    }
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    assert await chunks_of(attempt) == [
        (0, "stdout", "line one\n"),
        (1, "stderr", "warning\n"),
        (2, "stdout", "line three\n"),
    ]
    assert await output_of(attempt) == {
        "stdout": "line one\nline three\n",
        "stderr": "warning\n",
        "combined": "line one\nwarning\nline three\n",
    }
    attempt = await refreshed(attempt)
    assert attempt.status == status
    assert attempt.exit_code == exit_code
    assert attempt.reason == reason
    assert attempt.started_at.timestamp() == pytest.approx(frame["started_at"], abs=1e-3)
    assert attempt.finished_at.timestamp() == pytest.approx(frame["finished_at"], abs=1e-3)
    assert (attempt.output_bytes, attempt.stored_bytes, attempt.truncated) == (28, 28, False)
    run = await run_of(attempt)
    assert run.status == run_status
    assert run.finished_at == attempt.finished_at
    assert await agent.receive_nothing()


async def test_it_stores_output_sent_one_frame_per_message_in_order(agent, linux_task):
    """A protocol 1 agent sends each frame alone: however the master batches
    them, every line is stored once, in seq order, before the result."""
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    await agent.send_json_to({"type": "started", "attempt": attempt.pk, "pid": 99})
    for seq, stream, data in [
        (0, "stdout", "one\n"),
        (2, "stdout", "three\n"),
        (1, "stderr", "two\n"),
    ]:
        await agent.send_json_to(
            {"type": "log", "attempt": attempt.pk, "seq": seq, "stream": stream, "data": data}
        )
    await agent.send_json_to(finished_frame(attempt, 0, output_bytes=14))

    acked_seqs = []
    while (frame := await agent.receive_json_from(timeout=TIMEOUT))["type"] == "log_ack":
        acked_seqs.append(frame["seq"])
    assert frame == {"type": "ack", "attempt": attempt.pk}
    assert max(acked_seqs) == 2
    assert await chunks_of(attempt) == [
        (0, "stdout", "one\n"),
        (1, "stderr", "two\n"),
        (2, "stdout", "three\n"),
    ]
    assert (await refreshed(attempt)).status == Attempt.Status.SUCCEEDED
    assert await agent.receive_nothing()


async def test_it_acks_a_replayed_result_without_storing_it_again(agent, linux_task):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    await agent.send_json_to(finished_frame(attempt, 0))
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    first = await refreshed(attempt)
    first_finished_at, first_run = first.finished_at, await run_of(first)

    await agent.send_json_to(
        finished_frame(attempt, 3, finished_at=first_finished_at.timestamp() + 60)
    )

    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    again = await refreshed(attempt)
    assert (again.status, again.exit_code, again.reason) == ("succeeded", 0, "")
    assert again.finished_at == first_finished_at
    run = await run_of(attempt)
    assert (run.status, run.finished_at) == (Run.Status.SUCCEEDED, first_run.finished_at)
    assert await database_sync_to_async(Attempt.objects.count)() == 1
    assert await agent.receive_nothing()


async def test_it_keeps_a_late_result_beside_the_lost_verdict(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    comm = await connect(worker_credential)
    # The agent lost its process with its previous connection...
    await comm.send_json_to(hello_frame(running=[]))
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert (await refreshed(attempt)).status == Attempt.Status.LOST

    # ...yet a result for it turns up from its spool.
    await comm.send_json_to(finished_frame(attempt, 0, output_bytes=3))

    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    assert await comm.receive_nothing()
    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.exit_code) == (Attempt.Status.LOST, None)
    assert (attempt.late_status, attempt.late_exit_code) == ("succeeded", 0)
    assert attempt.late_reported_at is not None
    assert attempt.is_superseded
    assert (await run_of(attempt)).status == Run.Status.FAILED


async def test_it_refuses_reports_about_another_workers_attempt(
    connect, worker, worker_credential, task
):
    other = await make_worker("node-2", OTHER_CREDENTIAL)
    theirs = await place(task, other, started=True)
    comm = await connect(worker_credential)
    await comm.send_json_to(hello_frame())
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)

    await comm.send_json_to({"type": "started", "attempt": theirs.pk, "pid": 1})
    assert await comm.receive_json_from(timeout=TIMEOUT) == unknown_attempt(theirs.pk)
    # Whatever it started under that id is not its to run.
    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "cancel", "attempt": theirs.pk}

    await comm.send_json_to(
        {"type": "log", "attempt": theirs.pk, "seq": 0, "stream": "stdout", "data": "forged\n"}
    )
    assert await comm.receive_json_from(timeout=TIMEOUT) == unknown_attempt(
        theirs.pk, "output for an attempt you do not run"
    )

    await comm.send_json_to(finished_frame(theirs, 0))
    assert await comm.receive_json_from(timeout=TIMEOUT) == unknown_attempt(theirs.pk)
    # Acked all the same, so that the agent's spool drains.
    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": theirs.pk}
    assert await comm.receive_nothing()

    after = await refreshed(theirs)
    assert after.status == Attempt.Status.RUNNING
    assert after.worker_id == other.pk
    assert (after.pid, after.exit_code, after.finished_at) == (4242, None, None)
    assert (after.stored_bytes, after.truncated) == (0, False)
    assert await chunks_of(theirs) == []
    assert (await run_of(after)).status == Run.Status.RUNNING


async def test_it_refuses_reports_about_an_attempt_that_does_not_exist(agent):
    missing = 987654

    await agent.send_json_to({"type": "started", "attempt": missing, "pid": 1})
    assert await agent.receive_json_from(timeout=TIMEOUT) == unknown_attempt(missing)
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "cancel", "attempt": missing}
    await agent.send_json_to(
        {"type": "log", "attempt": missing, "seq": 0, "stream": "stderr", "data": "?"}
    )
    assert await agent.receive_json_from(timeout=TIMEOUT) == unknown_attempt(
        missing, "output for an attempt you do not run"
    )
    await agent.send_json_to({**finished_frame(Attempt(pk=missing), 0)})
    assert await agent.receive_json_from(timeout=TIMEOUT) == unknown_attempt(missing)
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": missing}
    assert await agent.receive_nothing()
    assert await database_sync_to_async(LogChunk.objects.count)() == 0


async def test_it_caps_stored_output_and_marks_it_truncated(settings, agent, linux_task):
    settings.SCHEDULER_LOG_LIMIT_BYTES = 10
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    batch = [
        {"type": "log", "attempt": attempt.pk, "seq": seq, "stream": "stdout", "data": data}
        for seq, data in enumerate(["hello world\n", "more output\n"])
    ]
    batch.append(finished_frame(attempt, 0, output_bytes=24, truncated=True))

    await agent.send_to(text_data=json.dumps(batch))

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "log_ack",
        "attempt": attempt.pk,
        "seq": 1,
    }
    assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    assert await chunks_of(attempt) == [(0, "stdout", "hello worl")]
    attempt = await refreshed(attempt)
    assert (attempt.stored_bytes, attempt.output_bytes, attempt.truncated) == (10, 24, True)
    marker = "\n[output truncated: kept 10 of 24 bytes]\n"
    assert (await output_of(attempt))["stdout"] == "hello worl" + marker
    assert await agent.receive_nothing()


# --- reconnecting and disconnecting ---------------------------------------------


async def test_it_marks_attempts_lost_when_the_agent_reconnects_without_them(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(running=[]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_nothing()
    attempt = await refreshed(attempt)
    assert attempt.status == Attempt.Status.LOST
    assert attempt.reason == "worker lost: the agent reconnected without it"
    assert attempt.finished_at is not None
    assert (await run_of(attempt)).status == Run.Status.FAILED


async def test_it_keeps_attempts_the_agent_still_runs_after_reconnecting(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(running=[attempt.pk]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_nothing()
    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.worker_id, attempt.reason) == ("running", worker.pk, "")


async def test_it_keeps_an_attempt_whose_result_the_agent_has_spooled(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(running=[], spooled=[attempt.pk]))
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert (await refreshed(attempt)).status == Attempt.Status.RUNNING
    await comm.send_json_to(finished_frame(attempt, 0))

    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "attempt": attempt.pk}
    assert await comm.receive_nothing()
    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.exit_code) == (Attempt.Status.SUCCEEDED, 0)


async def test_it_stops_a_process_the_master_has_given_up_on(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    await database_sync_to_async(lifecycle.mark_lost)(worker.pk, "worker lost: test")
    comm = await connect(worker_credential)

    # A retry may run elsewhere: the old process must not overlap it.
    await comm.send_json_to(hello_frame(running=[attempt.pk]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "cancel",
        "attempt": attempt.pk,
    }
    assert await comm.receive_nothing()
    assert (await refreshed(attempt)).status == Attempt.Status.LOST


async def test_it_resends_assignments_that_were_never_started(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=False)
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(running=[]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    assert await comm.receive_nothing()
    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.worker_id) == ("assigned", worker.pk)


async def test_it_takes_a_worker_offline_on_disconnect_but_keeps_its_attempts(
    agent, worker, linux_task
):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    await agent.send_json_to({"type": "started", "attempt": attempt.pk, "pid": 7})
    await barrier(agent)
    assert await agent.receive_nothing()

    await agent.disconnect(timeout=TIMEOUT)

    worker = await refreshed(worker)
    assert (worker.state, worker.channel_name) == (Worker.State.OFFLINE, "")
    # The agent may come back within the grace period; the reaper decides later.
    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.worker_id) == (Attempt.Status.RUNNING, worker.pk)


async def test_it_tells_a_reconnecting_worker_to_keep_draining(
    connect, worker, worker_credential, linux_task
):
    await database_sync_to_async(Worker.objects.filter(pk=worker.pk).update)(drain_requested=True)
    attempt = await trigger(linux_task)
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame())

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_json_from(timeout=TIMEOUT) == {"type": "drain"}
    assert await comm.receive_nothing()
    assert (await refreshed(worker)).state == Worker.State.DRAINING
    assert (await refreshed(attempt)).status == Attempt.Status.QUEUED


async def test_it_marks_a_worker_draining_when_its_agent_says_so(agent, worker, linux_task):
    await agent.send_json_to({"type": "heartbeat", "running": [], "draining": True})
    await barrier(agent)

    assert (await refreshed(worker)).state == Worker.State.DRAINING
    attempt = await trigger(linux_task)
    assert await agent.receive_nothing()
    assert (await refreshed(attempt)).status == Attempt.Status.QUEUED


async def test_it_resends_cancels_of_cancelled_runs_after_a_reconnect(
    connect, worker, worker_credential, task
):
    attempt = await place(task, worker, started=True)
    await database_sync_to_async(lifecycle.cancel_run)(await run_of(attempt))
    comm = await connect(worker_credential)

    await comm.send_json_to(hello_frame(running=[attempt.pk]))

    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    assert await comm.receive_json_from(timeout=TIMEOUT) == {
        "type": "cancel",
        "attempt": attempt.pk,
    }
    assert await comm.receive_nothing()


async def test_it_ignores_the_disconnect_of_a_connection_that_was_replaced(
    connect, agent, worker, worker_credential
):
    newer = await connect(worker_credential)
    await newer.send_json_to(hello_frame(hostname="box-b.example"))
    assert await newer.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    channel = (await refreshed(worker)).channel_name

    await agent.disconnect(timeout=TIMEOUT)

    worker = await refreshed(worker)
    assert (worker.state, worker.channel_name) == (Worker.State.ONLINE, channel)
    assert worker.hostname == "box-b.example"
    assert await newer.receive_nothing()


# --- rejected and revoked ------------------------------------------------------


async def test_it_requeues_a_rejected_attempt_and_dispatches_it_again(agent, worker, linux_task):
    attempt = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    # Draining: the re-dispatch after the rejection finds no worker, so the
    # attempt stays visibly queued until one is available.
    await database_sync_to_async(Worker.objects.filter(pk=worker.pk).update)(
        state=Worker.State.DRAINING
    )

    await agent.send_json_to({"type": "rejected", "attempt": attempt.pk, "reason": "draining"})
    await barrier(agent)

    attempt = await refreshed(attempt)
    assert (attempt.status, attempt.worker_id, attempt.assigned_at) == ("queued", None, None)
    # It is offered again only after a short backoff, so a disagreement about
    # free slots cannot bounce the same assign/reject pair in a tight loop.
    backoff = (attempt.not_before - timezone.now()).total_seconds()
    assert 0 < backoff <= reports.REJECT_BACKOFF_S
    assert await database_sync_to_async(dispatch.dispatch)() == []
    assert await agent.receive_nothing()

    await database_sync_to_async(Attempt.objects.filter(pk=attempt.pk).update)(
        ready_at=timezone.now(), queue_at=timezone.now()
    )
    await database_sync_to_async(Worker.objects.filter(pk=worker.pk).update)(
        state=Worker.State.ONLINE
    )
    assert await database_sync_to_async(dispatch.dispatch)() == [(worker.pk, attempt.pk)]

    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    assert (await refreshed(attempt)).status == Attempt.Status.ASSIGNED
    assert await agent.receive_nothing()


async def test_it_moves_a_rejected_attempt_to_another_worker(connect, agent, worker, linux_task):
    busy = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(busy)
    rejected = await trigger(linux_task)
    assert await agent.receive_json_from(timeout=TIMEOUT) == assign_for(rejected)
    other = await make_worker("node-2", OTHER_CREDENTIAL)
    second = await connect(OTHER_CREDENTIAL)
    await second.send_json_to(hello_frame(hostname="box-b.example"))
    assert await second.receive_json_from(timeout=TIMEOUT) == welcome_for(other)

    await agent.send_json_to({"type": "rejected", "attempt": rejected.pk, "reason": "full"})
    await barrier(agent)
    # After its reject backoff (skipped here) the next dispatch pass offers it again.
    await database_sync_to_async(Attempt.objects.filter(pk=rejected.pk).update)(
        ready_at=timezone.now(), queue_at=timezone.now()
    )
    await database_sync_to_async(dispatch.dispatch)()

    # node-1 still runs one of two slots, node-2 none: the least loaded gets it.
    assert await second.receive_json_from(timeout=TIMEOUT) == assign_for(rejected)
    rejected = await refreshed(rejected)
    assert (rejected.status, rejected.worker_id) == ("assigned", other.pk)
    assert await agent.receive_nothing()
    assert await second.receive_nothing()


async def test_it_closes_the_socket_of_a_revoked_worker(agent, connect, worker, worker_credential):
    await database_sync_to_async(registration.revoke)(worker)

    worker = await refreshed(worker)
    await sync_to_async(delivery.send_close)(worker.pk, worker.channel_name, 4403)

    assert await agent.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4403}
    await agent.disconnect(timeout=TIMEOUT)
    worker = await refreshed(worker)
    assert (worker.state, worker.channel_name) == (Worker.State.DISABLED, "")
    assert await connect(worker_credential, expect_accept=False) == (False, 4401)


# --- one connection per worker, no lost or duplicated frames ---------------------


async def test_a_second_connection_of_the_same_worker_closes_the_first(
    connect, agent, worker, worker_credential, linux_task
):
    newer = await connect(worker_credential)
    await newer.send_json_to(hello_frame())
    assert await newer.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    await barrier(newer)

    # The older socket is told to go away (it must never get an assignment) ...
    assert await agent.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4409}
    attempt = await trigger(linux_task)
    # ... and work goes only to the newer one.
    assert await newer.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    assert await newer.receive_nothing()


async def test_a_burst_of_150_assignments_all_reach_the_agent(
    connect, worker, worker_credential, task
):
    @database_sync_to_async
    def queue_runs() -> list[int]:
        # Room for all of them, as an admin decided (a hello cannot widen it).
        Worker.objects.filter(pk=worker.pk).update(capacity=150)
        return [lifecycle.trigger_run(task).attempts.get().pk for _ in range(150)]

    # Queued while the worker is offline, then one hello with room for all of them:
    # more frames than the in-memory layer holds per channel (100).
    pending = await queue_runs()
    comm = await connect(worker_credential)
    await comm.send_json_to(hello_frame(capacity=150, labels=[]))
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)

    received = [(await comm.receive_json_from(timeout=TIMEOUT))["attempt"] for _ in pending]

    assert sorted(received) == pending
    assert await comm.receive_nothing()


@pytest.mark.parametrize(
    "frame, message",
    [
        ({"type": "rejected", "attempt": 2**64}, "rejected: attempt out of range"),
        ({"type": "started", "attempt": 0}, "started: attempt out of range"),
        ({"type": "heartbeat", "running": [2**70]}, "heartbeat: running has an id out of range"),
        (
            {
                "type": "finished",
                "attempt": 1,
                "status": "succeeded",
                "exit_code": 0,
                "started_at": 1e300,
            },
            "finished: started_at is not a plausible time",
        ),
        (
            {"type": "finished", "attempt": 1, "status": "failed", "exit_code": 2**40},
            "finished: exit_code out of range",
        ),
        (
            {"type": "log", "attempt": 1, "seq": 0, "stream": "stdout", "data": "\ud800"},
            "log: text is not valid Unicode",
        ),
        (
            {"type": "log", "attempt": 1, "seq": 10**400, "stream": "stdout", "data": "x"},
            "log: field 'seq' is not a finite number",
        ),
    ],
)
async def test_out_of_range_values_get_an_error_frame_and_the_consumer_lives_on(
    agent, worker, frame, message
):
    await agent.send_to(text_data=json.dumps(frame))

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "malformed",
        "message": message,
    }
    await agent.send_json_to({"type": "heartbeat", "running": []})
    await barrier(agent)
    assert (await refreshed(worker)).state == Worker.State.ONLINE


async def test_a_failing_handler_answers_internal_error_and_keeps_the_socket(
    agent, worker, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(lifecycle, "start_many", broken)
    await agent.send_json_to({"type": "started", "attempt": 1, "pid": 3})

    assert await agent.receive_json_from(timeout=TIMEOUT) == {
        "type": "error",
        "code": "internal_error",
        "message": "the master could not handle this started",
    }
    await barrier(agent)
