"""The agent: its protocol core with exact frames, and its shell with real processes.

No master and no Django: the shell tests hand Agent.serve() a fake socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port
from workers_app import agent
from workers_app.agent import (
    Agent,
    AgentConfig,
    AgentCore,
    Backoff,
    KillProcess,
    RemoveSpool,
    Send,
    StartProcess,
    Welcomed,
    WriteSpool,
)

WELCOME = {
    "type": "welcome",
    "protocol": 2,
    "worker_id": 7,
    "name": "node-1",
    "heartbeat_s": 5,
    "log_limit_bytes": 4194304,
    "max_frame_bytes": 1048576,
    "lost_after_s": 15,
    "fence_after_s": None,
}


def make_core(capacity: int = 2, **kwargs: Any) -> AgentCore:
    return AgentCore(
        name="node-1", hostname="host-1", capacity=capacity, labels=["gpu", "linux"], **kwargs
    )


def online(core: AgentCore, **welcome: Any) -> AgentCore:
    core.connection_opened()
    core.receive(json.dumps({**WELCOME, **welcome}))
    return core


def assign(attempt: int, **overrides: Any) -> str:
    frame = {
        "type": "assign",
        "attempt": attempt,
        "run": 100 + attempt,
        "task_name": "answer",
        "argv": ["python", "-c", "print(1)"],
        "shell": None,
        "env": {"K": "V"},
        "cwd": None,
        "timeout": None,
        "shard_index": 0,
        "shard_count": 1,
    }
    frame.update(overrides)
    return json.dumps(frame)


def env_for(attempt: int, **extra: str) -> dict[str, str]:
    return {
        **extra,
        "SCHEDULER_RUN_ID": str(100 + attempt),
        "SCHEDULER_ATTEMPT_ID": str(attempt),
        "SCHEDULER_TASK_NAME": "answer",
        "SCHEDULER_SHARD_INDEX": "0",
        "SCHEDULER_SHARD_COUNT": "1",
    }


def finished(attempt: int, **fields: Any) -> dict[str, Any]:
    frame = {
        "type": "finished",
        "attempt": attempt,
        "status": "succeeded",
        "exit_code": 0,
        "reason": "",
        "started_at": 1000.0,
        "finished_at": 1002.5,
        "output_bytes": 0,
        "truncated": False,
        "last_seq": -1,
    }
    frame.update(fields)
    return frame


def running(core: AgentCore, attempt: int, **overrides: Any) -> AgentCore:
    core.receive(assign(attempt, **overrides))
    core.process_started(attempt, 4242, 1000.0)
    return core


# --------------------------------------------------------------------------
# Core: connection and assignment


def test_it_says_hello_with_its_identity_and_no_running_attempts() -> None:
    core = make_core()

    assert core.connection_opened() == [
        Send(
            {
                "type": "hello",
                "protocol": 2,
                "agent_version": "0.2.0",
                "hostname": "host-1",
                "name": "node-1",
                "capacity": 2,
                "labels": ["gpu", "linux"],
                "running": [],
                "spooled": [],
                "draining": False,
            }
        )
    ]


def test_it_lists_its_running_attempts_in_hello_after_a_reconnect() -> None:
    core = running(online(make_core()), 9)
    running(core, 3)
    core.connection_lost()

    [hello] = core.connection_opened()

    assert hello.frame["running"] == [3, 9]


def test_welcome_sets_the_intervals_and_is_announced_to_the_shell() -> None:
    core = make_core()
    core.connection_opened()

    out = core.receive(json.dumps({**WELCOME, "heartbeat_s": 2, "log_limit_bytes": 1000}))

    assert out == [Welcomed(7, 2.0)]
    assert (core.online, core.heartbeat_s, core.log_limit_bytes) == (True, 2.0, 1000)


@pytest.mark.parametrize(("offered", "used"), [(2, 2), (1, 1), (3, 1), (0, 1)])
def test_it_uses_the_protocol_of_the_welcome_and_falls_back_to_1(offered: int, used: int) -> None:
    core = make_core()
    core.connection_opened()
    assert core.protocol == 1  # the hello goes alone, before any welcome

    core.receive(json.dumps({**WELCOME, "protocol": offered}))
    assert core.protocol == used

    core.connection_lost()
    core.connection_opened()
    assert core.protocol == 1


def test_it_handles_an_array_of_frames_in_order_and_joins_their_outputs() -> None:
    core = online(make_core())

    out = core.receive(
        json.dumps([json.loads(assign(1)), {"type": "cancel", "attempt": 1}, json.loads(assign(2))])
    )

    assert out == [
        Send({"type": "accepted", "attempt": 1}),
        StartProcess(1, ["python", "-c", "print(1)"], env_for(1, K="V"), None, None),
        KillProcess(1),
        Send({"type": "accepted", "attempt": 2}),
        StartProcess(2, ["python", "-c", "print(1)"], env_for(2, K="V"), None, None),
    ]


def test_a_welcome_in_an_array_with_the_cancels_of_a_reconnect_is_handled() -> None:
    core = running(online(make_core()), 1)
    core.connection_lost()
    core.connection_opened()

    out = core.receive(json.dumps([WELCOME, {"type": "cancel", "attempt": 1}]))

    assert out == [Welcomed(7, 5.0), KillProcess(1)]
    assert (core.online, core.protocol) == (True, 2)


def test_a_bad_frame_in_an_array_does_not_stop_the_others() -> None:
    core = online(make_core())

    out = core.receive(json.dumps([{"type": "bogus"}, {"type": "assign", "attempt": 3}, "x"]))

    assert out == [
        Send({"type": "rejected", "attempt": 3, "reason": "invalid assign: missing field 'run'"})
    ]


def test_it_accepts_an_assign_and_starts_the_process() -> None:
    core = online(make_core())

    out = core.receive(assign(5, timeout=30))

    assert out == [
        Send({"type": "accepted", "attempt": 5}),
        StartProcess(5, ["python", "-c", "print(1)"], env_for(5, K="V"), None, 30),
    ]


def test_it_runs_a_shell_line_through_bin_sh() -> None:
    core = online(make_core())

    out = core.receive(assign(5, argv=None, shell="echo hi | wc -c", env={}, cwd="/tmp"))

    assert out[1] == StartProcess(5, ["/bin/sh", "-c", "echo hi | wc -c"], env_for(5), "/tmp", None)


def test_it_rejects_an_assign_beyond_capacity() -> None:
    core = online(make_core(capacity=1))
    core.receive(assign(1))

    out = core.receive(assign(2))

    assert out == [
        Send({"type": "rejected", "attempt": 2, "reason": "agent at capacity (1 running)"})
    ]
    assert core.running_ids == [1]


def test_it_ignores_a_duplicate_assign_of_a_running_attempt() -> None:
    core = online(make_core())
    core.receive(assign(1))

    assert core.receive(assign(1)) == []
    assert core.running_ids == [1]


def test_it_resends_the_result_when_a_finished_attempt_is_assigned_again() -> None:
    core = running(online(make_core()), 1)
    core.process_exited(1, 0, 1002.5)

    assert core.receive(assign(1)) == [Send(finished(1))]
    assert core.running_ids == []


def test_it_rejects_assigns_while_draining_and_accepts_after_resume() -> None:
    core = online(make_core())
    core.receive('{"type": "drain"}')

    assert core.receive(assign(1)) == [
        Send({"type": "rejected", "attempt": 1, "reason": "agent is draining"})
    ]
    core.receive('{"type": "resume"}')
    assert core.receive(assign(1))[0] == Send({"type": "accepted", "attempt": 1})


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"shell": "true"}, "exactly one of argv and shell must be set"),
        ({"argv": None}, "exactly one of argv and shell must be set"),
        ({"argv": []}, "argv must be a non-empty list of strings"),
        ({"argv": ["ls", 3]}, "argv must be a non-empty list of strings"),
        ({"env": {"K": 1}}, "env must map names to strings"),
        ({"timeout": 0}, "timeout must be a positive number or null"),
        ({"cwd": 5}, "field 'cwd' has the wrong type"),
        ({"env": None}, "field 'env' has the wrong type"),
        ({"run": "101"}, "field 'run' has the wrong type"),
        # Numbers Python's JSON parser takes but nothing can schedule by.
        ({"timeout": float("nan")}, "field 'timeout' is not a finite number"),
        ({"timeout": 10**400}, "field 'timeout' is not a finite number"),
        # A lone surrogate (a JSON escape) cannot reach execve, a file or the socket.
        ({"argv": ["echo", "\ud800"]}, "text is not valid Unicode"),
        ({"cwd": "/tmp/\udc80"}, "text is not valid Unicode"),
        ({"env": {"K": "\udfff"}}, "text is not valid Unicode"),
    ],
)
def test_it_rejects_an_invalid_assign_with_the_reason(overrides: dict, reason: str) -> None:
    core = online(make_core())

    out = core.receive(assign(4, **overrides))

    assert out == [Send({"type": "rejected", "attempt": 4, "reason": f"invalid assign: {reason}"})]
    assert core.running_ids == []


def test_it_rejects_an_assign_missing_a_field_and_names_it() -> None:
    core = online(make_core())
    frame = json.loads(assign(4))
    del frame["shard_count"]

    out = core.receive(json.dumps(frame))

    assert out == [
        Send(
            {
                "type": "rejected",
                "attempt": 4,
                "reason": "invalid assign: missing field 'shard_count'",
            }
        )
    ]
    assert core.running_ids == []


def test_it_does_not_reject_a_malformed_repeat_of_an_attempt_it_runs() -> None:
    core = running(online(make_core()), 4)

    # Rejecting it would let the master queue again what still runs here.
    assert core.receive(assign(4, cwd=5)) == []
    assert core.running_ids == [4]


def test_heartbeat_lists_running_attempts_only_while_online() -> None:
    core = running(online(make_core()), 2)

    assert core.heartbeat() == [Send({"type": "heartbeat", "running": [2], "draining": False})]
    core.connection_lost()
    assert core.heartbeat() == []


# --------------------------------------------------------------------------
# Core: results


@pytest.mark.parametrize(
    ("returncode", "status", "reason"),
    [
        (0, "succeeded", ""),
        (3, "failed", "exit code 3"),
        (-9, "failed", "killed by signal 9"),
    ],
)
def test_it_maps_the_exit_status_to_a_result(returncode: int, status: str, reason: str) -> None:
    core = running(online(make_core()), 1)

    out = core.process_exited(1, returncode, 1002.5)

    frame = finished(1, status=status, exit_code=returncode, reason=reason)
    # The spool write comes first so the result survives a crash before the send.
    assert out == [WriteSpool(1, frame), Send(frame)]
    assert core.running_ids == []
    assert core.unacked_ids == [1]


def test_cancel_kills_the_process_and_reports_cancelled() -> None:
    core = running(online(make_core()), 1)

    assert core.receive('{"type": "cancel", "attempt": 1}') == [KillProcess(1)]
    out = core.process_exited(1, -15, 1002.5)

    assert out[-1] == Send(finished(1, status="cancelled", exit_code=-15, reason="cancelled"))


def test_cancel_of_an_unknown_attempt_is_ignored() -> None:
    core = online(make_core())

    assert core.receive('{"type": "cancel", "attempt": 99}') == []


def test_a_passed_deadline_kills_the_process_and_reports_timed_out() -> None:
    core = running(online(make_core()), 1, timeout=2)

    assert core.deadline_passed(1) == [KillProcess(1)]
    # A cancel arriving during the grace does not rewrite why it was killed.
    core.receive('{"type": "cancel", "attempt": 1}')
    out = core.process_exited(1, -15, 1002.5)

    assert out[-1] == Send(
        finished(1, status="timed_out", exit_code=-15, reason="timed out after 2s")
    )


def test_it_reports_a_command_that_cannot_start_as_failed() -> None:
    core = online(make_core())
    core.receive(assign(1))

    out = core.process_failed_to_start(
        1, "cannot start: No such file or directory (nosuchcmd)", 1002.5
    )

    frame = finished(
        1,
        status="failed",
        exit_code=None,
        reason="cannot start: No such file or directory (nosuchcmd)",
        started_at=None,
    )
    assert out == [WriteSpool(1, frame), Send(frame)]


def test_ack_removes_the_spooled_result_once() -> None:
    core = running(online(make_core()), 1)
    core.process_exited(1, 0, 1002.5)

    assert core.receive('{"type": "ack", "attempt": 1}') == [RemoveSpool(1)]
    assert core.receive('{"type": "ack", "attempt": 1}') == []
    assert core.unacked_ids == []


# --------------------------------------------------------------------------
# Core: output


def test_it_batches_output_until_a_flush() -> None:
    core = running(online(make_core()), 1)

    assert core.output(1, "stdout", b"line 1\n") == []
    assert core.output(1, "stdout", b"line 2\n") == []
    assert core.has_pending_logs

    assert core.flush_logs() == [
        Send(
            {"type": "log", "attempt": 1, "seq": 0, "stream": "stdout", "data": "line 1\nline 2\n"}
        )
    ]
    assert not core.has_pending_logs


def test_it_sends_a_full_batch_without_waiting_for_the_flush() -> None:
    core = running(online(make_core()), 1)

    out = core.output(1, "stdout", b"x" * (64 * 1024 + 10))

    assert [(o.frame["seq"], len(o.frame["data"])) for o in out] == [(0, 64 * 1024)]
    assert core.flush_logs()[0].frame["data"] == "x" * 10


def test_seq_is_contiguous_across_both_streams() -> None:
    core = running(online(make_core()), 1)
    core.output(1, "stdout", b"a")
    core.output(1, "stderr", b"b")
    first = core.flush_logs()
    core.output(1, "stdout", b"c")

    out = first + core.process_exited(1, 0, 1002.5)

    assert [(o.frame["type"], o.frame.get("seq"), o.frame.get("stream")) for o in out] == [
        ("log", 0, "stdout"),
        ("log", 1, "stderr"),
        ("log", 2, "stdout"),
        ("finished", None, None),
        ("finished", None, None),
    ]
    assert out[-1].frame["last_seq"] == 2
    assert out[-1].frame["output_bytes"] == 3


def test_it_keeps_a_multibyte_character_split_across_reads() -> None:
    core = running(online(make_core()), 1)
    core.output(1, "stdout", "aé".encode()[:2])  # b"a\xc3"
    first = core.flush_logs()
    core.output(1, "stdout", "aéb".encode()[2:])  # b"\xa9b"

    assert [o.frame["data"] for o in first + core.flush_logs()] == ["a", "éb"]


def test_it_replaces_invalid_utf8_instead_of_failing() -> None:
    core = running(online(make_core()), 1)
    core.output(1, "stderr", b"bad \xff\xfe end")

    assert core.flush_logs()[0].frame["data"] == "bad \ufffd\ufffd end"


def test_it_stops_sending_output_past_the_log_limit_and_counts_the_rest() -> None:
    core = running(online(make_core(), log_limit_bytes=10), 1)

    core.output(1, "stdout", b"aaaaaa")
    core.output(1, "stderr", b"bbbbbb")
    core.output(1, "stdout", b"cccccc")
    out = core.process_exited(1, 0, 1002.5)

    logs = [o.frame for o in out if o.frame["type"] == "log"]
    assert [(f["stream"], f["data"]) for f in logs] == [("stdout", "aaaaaa"), ("stderr", "bbbb")]
    assert out[-1] == Send(finished(1, output_bytes=18, truncated=True, last_seq=1))


def test_output_exactly_at_the_limit_is_not_truncated() -> None:
    core = running(online(make_core(), log_limit_bytes=4), 1)
    core.output(1, "stdout", b"abcd")

    assert core.process_exited(1, 0, 1002.5)[-1].frame["truncated"] is False


# --------------------------------------------------------------------------
# Core: disconnects and the spool


def test_logs_produced_offline_are_sent_after_welcome_and_before_the_result() -> None:
    core = running(online(make_core()), 1)
    core.connection_lost()
    core.output(1, "stdout", b"while away\n")

    out = core.process_exited(1, 0, 1002.5)
    assert out == [WriteSpool(1, finished(1, output_bytes=11, last_seq=0))]

    assert core.connection_opened()[0].frame["running"] == []
    assert core.receive(json.dumps(WELCOME)) == [
        Welcomed(7, 5.0),
        Send({"type": "log", "attempt": 1, "seq": 0, "stream": "stdout", "data": "while away\n"}),
        Send(finished(1, output_bytes=11, last_seq=0)),
    ]


def test_frames_that_did_not_leave_before_a_disconnect_are_sent_again() -> None:
    core = running(online(make_core()), 1)
    core.output(1, "stdout", b"x")
    [log] = core.flush_logs()
    started = {"type": "started", "attempt": 1, "pid": 4242, "started_at": 1000.0}
    # The log frame was written to the socket (not in unsent) and still comes again:
    # the master may never have read it.
    core.connection_lost(unsent=[started, {"type": "heartbeat", "running": [1]}])

    core.connection_opened()
    out = core.receive(json.dumps(WELCOME))

    assert out == [Welcomed(7, 5.0), Send(started), log]


def test_spooled_results_are_replayed_after_every_welcome_in_attempt_order() -> None:
    core = make_core(spooled=[finished(12), finished(3)])

    first = online(core)
    assert core.unacked_ids == [3, 12]
    core.connection_lost()
    core.connection_opened()

    out = first.receive(json.dumps(WELCOME))
    assert out == [Welcomed(7, 5.0), Send(finished(3)), Send(finished(12))]


def test_hello_lists_finished_unacked_attempts_as_spooled_not_running() -> None:
    core = running(online(make_core()), 1)
    running(core, 2)
    core.process_exited(2, 0, 1002.5)
    core.connection_lost()

    [hello] = core.connection_opened()

    # Attempt 2 is in the spool and comes back as a finished frame after the
    # welcome; the master must not declare it lost meanwhile.
    assert (hello.frame["running"], hello.frame["spooled"]) == ([1], [2])


def test_a_cancel_after_a_reconnect_kills_an_attempt_that_is_still_running() -> None:
    core = running(online(make_core()), 1)
    core.connection_lost()
    online(core)  # the master may have re-queued attempt 1 meanwhile

    assert core.receive('{"type": "cancel", "attempt": 1}') == [KillProcess(1)]
    out = core.process_exited(1, -15, 1002.5)

    assert out[-1] == Send(finished(1, status="cancelled", exit_code=-15, reason="cancelled"))


def test_a_cancel_of_a_finished_but_unacked_attempt_is_ignored() -> None:
    core = running(online(make_core()), 1)
    core.process_exited(1, 0, 1002.5)

    assert core.receive('{"type": "cancel", "attempt": 1}') == []
    assert core.unacked_ids == [1]


# --------------------------------------------------------------------------
# Core: draining and shutdown


def test_a_stop_request_drains_and_says_so_in_a_heartbeat_at_once() -> None:
    core = running(online(make_core()), 1)

    assert core.begin_shutdown(30) == [
        Send({"type": "heartbeat", "running": [1], "draining": True})
    ]
    # Nothing is killed: the running command may finish within the drain timeout.
    assert core.heartbeat() == [Send({"type": "heartbeat", "running": [1], "draining": True})]
    assert core.begin_shutdown(30) == []


def test_hello_says_draining_after_a_reconnect_during_a_shutdown() -> None:
    core = running(online(make_core()), 1)
    core.connection_lost()

    assert core.begin_shutdown(30) == []  # offline: the next hello carries it

    [hello] = core.connection_opened()
    assert (hello.frame["draining"], hello.frame["running"]) == (True, [1])


def test_it_rejects_assigns_during_a_shutdown_and_a_resume_does_not_undo_it() -> None:
    core = online(make_core())
    core.begin_shutdown(30)

    core.receive('{"type": "resume"}')

    assert core.receive(assign(1)) == [
        Send({"type": "rejected", "attempt": 1, "reason": "agent is draining"})
    ]
    assert core.heartbeat() == [Send({"type": "heartbeat", "running": [], "draining": True})]


def test_the_masters_drain_and_resume_show_in_heartbeat_and_hello() -> None:
    core = running(online(make_core()), 1)

    assert core.receive('{"type": "drain"}') == []
    assert core.heartbeat() == [Send({"type": "heartbeat", "running": [1], "draining": True})]
    assert core.connection_opened()[0].frame["draining"] is True
    online(core)

    assert core.receive('{"type": "resume"}') == []
    assert core.heartbeat() == [Send({"type": "heartbeat", "running": [1], "draining": False})]
    # A master drain is not a shutdown: the command keeps running.
    assert (core.shutting_down, core.running_ids) == (False, [1])


def test_a_drain_timeout_kills_what_still_runs_and_reports_it_lost() -> None:
    core = running(online(make_core()), 1)
    running(core, 2)
    core.begin_shutdown(30)

    assert core.drain_expired() == [KillProcess(1), KillProcess(2)]
    out = core.process_exited(1, -15, 1002.5)

    frame = finished(
        1, status="lost", exit_code=-15, reason="agent shut down: drain timeout of 30s passed"
    )
    assert out == [WriteSpool(1, frame), Send(frame)]


def test_a_drain_timeout_keeps_the_reason_of_an_attempt_already_being_cancelled() -> None:
    core = running(online(make_core()), 1)
    core.receive('{"type": "cancel", "attempt": 1}')
    core.begin_shutdown(1.5)

    assert core.drain_expired() == []
    assert core.process_exited(1, -15, 1002.5)[-1].frame["status"] == "cancelled"


def test_a_second_stop_request_kills_at_once_and_reports_lost() -> None:
    core = running(online(make_core()), 1)
    core.begin_shutdown(30)

    assert core.shutdown_now() == [KillProcess(1)]
    out = core.process_exited(1, -9, 1002.5)

    assert out[-1] == Send(
        finished(
            1,
            status="lost",
            exit_code=-9,
            reason="agent shut down: killed by a second signal during the drain",
        )
    )


def test_it_is_drained_once_nothing_runs_and_every_result_is_acked() -> None:
    core = running(online(make_core(spooled=[finished(3)])), 1)
    core.begin_shutdown(30)

    assert not core.drained
    core.process_exited(1, 0, 1002.5)
    core.receive('{"type": "ack", "attempt": 1}')
    assert not core.drained  # the spooled result of a previous run is not acked yet
    core.receive('{"type": "ack", "attempt": 3}')
    assert core.drained


# --------------------------------------------------------------------------
# Core: self-fencing


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_it_self_fences_when_the_master_is_away_for_fence_after_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    core = running(online(make_core(clock=clock), fence_after_s=10), 1)
    core.connection_lost()

    clock.now = 109.9
    assert core.fence_due == 110.0
    assert core.check_fence() == []
    clock.now = 110.0
    with caplog.at_level("WARNING", logger="scheduler_agent"):
        assert core.check_fence() == [KillProcess(1)]
    assert core.check_fence() == []  # once
    assert core.fence_due is None

    # Offline, the result only goes to the spool; the next welcome replays it.
    frame = finished(
        1,
        status="lost",
        exit_code=-15,
        reason="self-fenced: no contact with the master for 10s",
        finished_at=110.5,
    )
    assert core.process_exited(1, -15, 110.5) == [WriteSpool(1, frame)]
    assert "self-fenced: no contact with the master for 10s; killing attempts [1]" in [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    ]


def test_the_fence_clock_runs_across_reconnect_attempts_until_a_welcome() -> None:
    clock = Clock()
    core = running(online(make_core(clock=clock), fence_after_s=10), 1)
    core.connection_lost()  # t=100

    clock.now = 105.0
    core.connection_opened()  # a socket, but no welcome
    core.connection_lost()
    assert core.fence_due == 110.0

    clock.now = 107.0
    online(core, fence_after_s=10)
    assert core.fence_due is None
    clock.now = 108.0
    core.connection_lost()
    assert core.fence_due == 118.0
    clock.now = 117.0
    assert core.check_fence() == []


@pytest.mark.parametrize("fence", [None, 0, -1])
def test_it_never_self_fences_without_a_positive_fence_after_s(fence: Any) -> None:
    clock = Clock()
    core = running(online(make_core(clock=clock), fence_after_s=fence), 1)
    core.connection_lost()

    clock.now = 1e9
    assert (core.fence_after_s, core.fence_due, core.check_fence()) == (None, None, [])


def test_it_does_not_self_fence_with_nothing_running() -> None:
    clock = Clock()
    core = online(make_core(clock=clock), fence_after_s=1)
    core.connection_lost()

    clock.now = 1e9
    assert (core.fence_due, core.check_fence()) == (None, [])


# --------------------------------------------------------------------------
# Core: log acknowledgements


def log_frame(attempt: int, seq: int, data: str, stream: str = "stdout") -> dict[str, Any]:
    return {"type": "log", "attempt": attempt, "seq": seq, "stream": stream, "data": data}


def test_a_log_ack_drops_the_log_frames_it_covers() -> None:
    core = running(online(make_core()), 1)
    for data in (b"a", b"b", b"c"):
        core.output(1, "stdout", data)
        core.flush_logs()
    assert core.unacked_logs == {1: [0, 1, 2]}

    assert core.receive('{"type": "log_ack", "attempt": 1, "seq": 1}') == []
    assert core.unacked_logs == {1: [2]}
    assert core.receive('{"type": "log_ack", "attempt": 1, "seq": 0}') == []  # stale
    assert core.unacked_logs == {1: [2]}
    core.receive('{"type": "log_ack", "attempt": 1, "seq": 2}')
    assert core.unacked_logs == {}
    assert core.receive('{"type": "log_ack", "attempt": 9, "seq": 2}') == []


def test_unacked_logs_are_resent_in_order_after_a_reconnect_before_any_result() -> None:
    core = make_core(spooled=[finished(0)])
    running(online(core), 1)
    core.receive('{"type": "ack", "attempt": 0}')
    running(core, 2)
    core.output(1, "stdout", b"one")
    core.output(1, "stderr", b"two")
    core.flush_logs()  # sent: seq 0 and 1 of attempt 1
    core.receive('{"type": "log_ack", "attempt": 1, "seq": 0}')
    core.connection_lost()
    core.output(2, "stdout", b"away")
    core.output(1, "stdout", b"three")
    core.process_exited(1, 0, 1002.5)  # seq 2 of attempt 1, then its result, offline

    core.connection_opened()
    out = core.receive(json.dumps(WELCOME))

    assert out == [
        Welcomed(7, 5.0),
        Send(log_frame(1, 1, "two", "stderr")),
        Send(log_frame(1, 2, "three")),
        Send(finished(1, output_bytes=11, last_seq=2)),
    ]
    # Attempt 2's output is still only a partial batch; its flush sends it now.
    assert core.flush_logs() == [Send(log_frame(2, 0, "away"))]


def test_logs_of_every_attempt_precede_the_spooled_results() -> None:
    core = make_core(spooled=[finished(1)])
    running(online(core), 5)
    core.output(5, "stdout", b"x")
    core.flush_logs()
    core.connection_lost()

    core.connection_opened()
    out = core.receive(json.dumps(WELCOME))

    assert out == [Welcomed(7, 5.0), Send(log_frame(5, 0, "x")), Send(finished(1))]


def test_the_ack_of_a_result_drops_its_remaining_log_frames() -> None:
    core = running(online(make_core()), 1)
    core.output(1, "stdout", b"last words")
    core.process_exited(1, 0, 1002.5)
    assert core.unacked_logs == {1: [0]}

    core.receive('{"type": "ack", "attempt": 1}')

    assert core.unacked_logs == {}
    core.connection_lost()
    core.connection_opened()
    assert core.receive(json.dumps(WELCOME)) == [Welcomed(7, 5.0)]


def test_kept_log_data_is_bounded_by_the_log_limit() -> None:
    core = running(online(make_core(), log_limit_bytes=10), 1)
    for _ in range(5):
        core.output(1, "stdout", b"0123456789")
        core.flush_logs()

    assert core.unacked_logs == {1: [0]}


# --------------------------------------------------------------------------
# Core: bad input


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        b"\xff\xfe",
        "[]",
        "null",
        '{"no": "type"}',
        '{"type": 5}',
        '{"type": "bogus"}',
        '{"type": "assign"}',
        '{"type": "assign", "attempt": "7"}',
        '{"type": "assign", "attempt": true}',
        '{"type": "cancel", "attempt": [1]}',
        '{"type": "ack", "attempt": {}}',
        '{"type": "log_ack", "attempt": 1}',
        '{"type": "log_ack", "attempt": 1, "seq": "3"}',
        '{"type": "log_ack", "attempt": null, "seq": 3}',
        '{"type": "error"}',
        '{"type": "error", "code": "too_large", "message": "frame too big"}',
        '{"type": "__init__"}',
        '{"type": "welcome"}',
        '[{"type": "cancel"}, []]',
        "[[]]",
        '[null, 3, "x"]',
        '{"type": "cancel", "attempt": 1e400}',
        '{"type": "cancel", "attempt": ' + "9" * 400 + "}",
        '{"type": "log_ack", "attempt": 1, "seq": NaN}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_malformed_frames_are_ignored_without_raising(text: str | bytes) -> None:
    core = online(make_core())

    assert core.receive(text) == []
    assert core.running_ids == []


def test_a_welcome_with_values_out_of_range_keeps_the_defaults() -> None:
    core = make_core()
    core.connection_opened()

    out = core.receive(
        json.dumps({**WELCOME, "heartbeat_s": 0, "log_limit_bytes": -1, "max_frame_bytes": 0})
    )

    assert out == [Welcomed(7, 5.0)]
    assert (core.heartbeat_s, core.log_limit_bytes, core.max_frame_bytes) == (
        5.0,
        4 * 1024 * 1024,
        1024 * 1024,
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"heartbeat_s": "soon"},
        {"fence_after_s": True},
        {"worker_id": "7"},
        {"protocol": None},
        # NaN would pass "fence <= 0" and fence at the first disconnect.
        {"fence_after_s": float("nan")},
        {"heartbeat_s": float("inf")},
    ],
)
def test_a_welcome_with_a_field_of_the_wrong_type_is_ignored(fields: dict[str, Any]) -> None:
    core = make_core()
    core.connection_opened()

    assert core.receive(json.dumps({**WELCOME, **fields})) == []
    assert (core.online, core.heartbeat_s, core.fence_after_s) == (False, 5.0, None)


def test_a_welcome_missing_a_field_is_ignored() -> None:
    core = make_core()
    core.connection_opened()
    welcome = dict(WELCOME)
    del welcome["lost_after_s"]

    assert core.receive(json.dumps(welcome)) == []
    assert core.online is False


# --------------------------------------------------------------------------
# Backoff, URLs, CLI, registration


def test_backoff_doubles_from_half_a_second_to_a_cap_and_resets() -> None:
    backoff = Backoff(rng=lambda: 0.5)  # no jitter

    delays = [backoff.next_delay() for _ in range(8)]
    backoff.reset()

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert backoff.next_delay() == 0.5
    assert (
        0.4 <= Backoff(rng=lambda: 0.0).next_delay() < Backoff(rng=lambda: 0.99).next_delay() <= 0.6
    )


def test_while_work_is_at_stake_the_reconnect_cap_is_a_tenth_of_the_fence() -> None:
    # The default settings: fence_after_s = max(60 - 2 * 5, 60 / 2) = 50 s.
    assert agent.reconnect_cap(50.0, busy=True) == 5.0
    assert agent.reconnect_cap(2.0, busy=True) == 0.2
    # Never above the normal cap, and the normal cap when idle or without a fence.
    assert agent.reconnect_cap(600.0, busy=True) == 15.0
    assert agent.reconnect_cap(50.0, busy=False) == 15.0
    assert agent.reconnect_cap(None, busy=True) == 15.0
    assert agent.reconnect_cap(50.0, busy=True, cap=3.0) == 3.0


def test_a_lowered_cap_bounds_every_delay_jitter_included() -> None:
    steady = Backoff(rng=lambda: 0.5)  # no jitter
    high = Backoff(rng=lambda: 0.99)  # +19.6%

    assert [steady.next_delay(5.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert [round(high.next_delay(5.0), 3) for _ in range(4)] == [0.598, 1.196, 2.392, 4.784]
    assert high.next_delay(5.0) == 5.0
    # The lowered cap holds for that delay only, and never raises the Backoff's own.
    assert high.next_delay() == 15.0
    assert high.next_delay(40.0) == 15.0


def test_the_cores_backoff_cap_follows_running_attempts_and_unacked_results() -> None:
    core = online(make_core(), fence_after_s=50)
    assert core.backoff_cap == 15.0

    core.receive(assign(1))
    assert core.backoff_cap == 5.0
    core.process_started(1, pid=4242, started_at=1.0)
    core.process_exited(1, returncode=0, finished_at=2.0)
    assert (core.running_ids, core.unacked_ids) == ([], [1])
    assert core.backoff_cap == 5.0  # the result still has to reach the master

    core.receive(json.dumps({"type": "ack", "attempt": 1}))
    assert core.backoff_cap == 15.0


def test_without_a_fence_the_core_keeps_the_normal_cap_while_busy() -> None:
    core = online(make_core(), fence_after_s=None)
    core.receive(assign(1))

    assert core.running_ids == [1]
    assert core.backoff_cap == 15.0


def test_the_websocket_url_follows_the_server_scheme() -> None:
    assert agent.websocket_url("http://m:8000") == "ws://m:8000/ws/agent/"
    assert agent.websocket_url("https://m.example/sched") == "wss://m.example/sched/ws/agent/"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server", "ftp://m"], "is not an http:// or https:// URL"),
        (["--server", "m:8000"], "is not an http:// or https:// URL"),
        (["--server", "http://m", "--capacity", "0"], "0 is not between 1 and 1024"),
        (["--server", "http://m", "--capacity", "many"], "'many' is not a whole number"),
        (["--server", "http://m", "--labels", "gpu,bad label"], "invalid label 'bad label'"),
        (["--server", "http://m", "--drain-timeout", "-1"], "must be 0 or more seconds"),
        (["--capacity", "2"], "the following arguments are required: --server"),
    ],
)
def test_bad_flags_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        agent.main(argv)

    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_labels_drop_empty_items() -> None:
    args = agent.build_parser().parse_args(["--server", "http://m/", "--labels", "gpu,,linux,"])

    assert (args.servers, args.labels) == (("http://m",), ("gpu", "linux"))


def test_several_servers_come_from_repeats_and_commas_in_order() -> None:
    argv = ["--server", "http://a:8000/, https://b", "--server", "http://c:8000"]

    args = agent.build_parser().parse_args(argv)

    assert args.servers == ("http://a:8000", "https://b", "http://c:8000")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--server", "http://a", "--server", "http://a/"],
            "argument --server: 'http://a' is given more than once",
        ),
        (
            ["--server", "http://a:8000,http://b:8000,http://a:8000"],
            "argument --server: 'http://a:8000' is given more than once",
        ),
        (
            ["--server", "http://a,ftp://b"],
            "argument --server: 'ftp://b' is not an http:// or https:// URL",
        ),
        (
            ["--server", "http://a", "--server", "http://b:port"],
            "argument --server: 'http://b:port' has an invalid port",
        ),
        (["--server", " , "], "argument --server: ' , ' names no server"),
    ],
)
def test_bad_server_lists_exit_2_with_the_exact_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        agent.main(argv)

    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"scheduler-agent: error: {message}"


def test_the_rotation_moves_round_robin_after_two_failures_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rotation = agent.ServerRotation(["http://a", "http://b", "http://c"])

    with caplog.at_level("WARNING", logger="scheduler_agent"):
        seen = [rotation.current]
        for _ in range(6):
            moved = rotation.failed()
            seen.append(rotation.current)
            assert moved == (rotation.current if len(seen) % 2 else None)

    assert seen == [
        "http://a",
        "http://a",
        "http://b",
        "http://b",
        "http://c",
        "http://c",
        "http://a",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "server http://a failed 2 times in a row; moving to http://b",
        "server http://b failed 2 times in a row; moving to http://c",
        "server http://c failed 2 times in a row; moving to http://a",
    ]


def test_a_welcome_between_two_failures_keeps_the_server() -> None:
    rotation = agent.ServerRotation(["http://a", "http://b"])

    assert rotation.failed() is None  # a dropped connection
    rotation.welcomed()  # the reconnect to the same server worked
    assert rotation.failed() is None
    assert rotation.current == "http://a"
    assert rotation.failed() == "http://b"


def test_one_server_is_never_left(caplog: pytest.LogCaptureFixture) -> None:
    rotation = agent.ServerRotation(["http://lb"])

    with caplog.at_level("WARNING", logger="scheduler_agent"):
        assert [rotation.failed() for _ in range(5)] == [None] * 5

    assert rotation.current == "http://lb"
    assert caplog.records == []


def test_a_token_is_required_without_a_stored_credential(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        agent.main(["--server", "http://m", "--state-dir", str(tmp_path / "state")])

    assert exc.value.code == 2
    assert (
        f"an enrollment token is required to enroll (no credential in {tmp_path / 'state'}):"
        " set SCHEDULER_ENROLLMENT_TOKEN or pass --token-file"
    ) in capsys.readouterr().err


class _Master:
    """A one-route HTTP master answering registration (and a websocket
    handshake) with a canned response."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # websockets refuses a 1.0 answer to its handshake

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers["Content-Length"])
                outer.requests.append(
                    {"path": self.path, "json": json.loads(self.rfile.read(length))}
                )
                self._answer()

            def do_GET(self) -> None:  # noqa: N802 - the websocket handshake, refused
                self._answer()

            def _answer(self) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Master:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_it_registers_and_stores_the_credential_privately(tmp_path: Path) -> None:
    body = {"worker": {"id": 3, "name": "node-1"}, "credential": "s3cret"}
    state = tmp_path / "state"
    with _Master(201, body) as master:
        data = agent.register(
            [master.url], "enroll-me", name="node-1", capacity=2, labels=("gpu",), state_dir=state
        )

    assert master.requests[0]["path"] == "/api/workers/register"
    sent = master.requests[0]["json"]
    assert (sent["token"], sent["name"], sent["capacity"], sent["labels"]) == (
        "enroll-me",
        "node-1",
        2,
        ["gpu"],
    )
    stored = json.loads((state / "credential.json").read_text())
    assert (
        stored
        == data
        == {
            "server": master.url,
            "worker_id": 3,
            "name": "node-1",
            "credential": "s3cret",
        }
    )
    assert stat.S_IMODE((state / "credential.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_refused_registration_exits_2_with_the_masters_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"error": "invalid enrollment token", "errors": {"token": ["invalid"]}}
    with _Master(403, body) as master:
        code = agent.main(
            ["--server", master.url, "--token", "nope", "--state-dir", str(tmp_path / "s")]
        )

    assert code == 2
    assert "registration refused: invalid enrollment token" in capsys.readouterr().err
    assert not (tmp_path / "s" / "credential.json").exists()


def test_registration_moves_to_the_next_server_when_one_is_unreachable(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    body = {"worker": {"id": 3, "name": "node-1"}, "credential": "s3cret"}
    waits: list[float] = []
    with _Master(201, body) as master:
        data = agent.register(
            [dead, master.url],
            "enroll-me",
            name="node-1",
            capacity=2,
            labels=(),
            state_dir=tmp_path,
            backoff=Backoff(rng=lambda: 0.5),
            sleep=waits.append,
        )

    assert waits == [0.5, 1.0]  # two tries of the dead one, then the live one
    assert len(master.requests) == 1
    assert data["server"] == master.url
    assert json.loads((tmp_path / "credential.json").read_text())["server"] == master.url


@pytest.mark.parametrize(
    ("issued_by_another", "warnings"),
    [
        (False, []),
        (
            True,
            ["credential in {state} was issued by http://old.example, which is not among --server"],
        ),
    ],
)
def test_it_warns_only_when_the_credential_comes_from_a_server_not_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, issued_by_another: bool, warnings: list[str]
) -> None:
    state = tmp_path / "state"
    # The websocket handshake is refused with 401: the agent exits 3 right after the check.
    with _Master(401, {"error": "bad credential"}) as master:
        issuer = "http://old.example" if issued_by_another else master.url
        agent.save_credential(
            state, {"server": issuer, "worker_id": 3, "name": "node-1", "credential": "s3cret"}
        )
        other = f"http://127.0.0.1:{free_port()}"
        with caplog.at_level("WARNING", logger="scheduler_agent"):
            code = agent.main(
                ["--server", f"{master.url},{other}", "--state-dir", str(state), "--name", "n"]
            )

    assert code == 3
    assert [r.getMessage() for r in caplog.records if "credential in" in r.getMessage()] == [
        w.format(state=state) for w in warnings
    ]


# --------------------------------------------------------------------------
# Shell: real processes behind a fake socket


class FakeSocket:
    """Stands in for a websocket connection: frames pushed in, frames recorded out."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[str | None] = asyncio.Queue()
        self.messages: list[Any] = []  # as decoded: a frame, or an array of frames
        self.sent: list[dict[str, Any]] = []

    def push(self, frame: dict[str, Any]) -> None:
        self.incoming.put_nowait(json.dumps(frame))

    async def send(self, message: str) -> None:
        decoded = json.loads(message)
        self.messages.append(decoded)
        self.sent += decoded if isinstance(decoded, list) else [decoded]

    async def close(self) -> None:
        self.incoming.put_nowait(None)

    def __aiter__(self) -> FakeSocket:
        return self

    async def __anext__(self) -> str:
        message = await self.incoming.get()
        if message is None:
            raise StopAsyncIteration
        return message

    def of(self, kind: str, attempt: int | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.sent
            if f["type"] == kind and (attempt is None or f["attempt"] == attempt)
        ]

    def output(self, attempt: int, stream: str = "stdout") -> str:
        return "".join(f["data"] for f in self.of("log", attempt) if f["stream"] == stream)


async def wait_until(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


class Session:
    """An Agent serving a FakeSocket, welcomed by the 'master'."""

    def __init__(self, state_dir: Path, **welcome: Any) -> None:
        config = AgentConfig(servers=("http://master.invalid",), name="node-1", state_dir=state_dir)
        self.agent = Agent(config, "credential", hostname="host-1")
        self.ws = FakeSocket()
        self.welcome = {**WELCOME, **welcome}

    async def __aenter__(self) -> Session:
        self.task = asyncio.create_task(self.agent.serve(self.ws))
        self.ws.push(self.welcome)
        try:
            await wait_until(lambda: self.agent.core.online)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Whatever happened, nothing the session started outlives it.
        try:
            await self.ws.close()
            await asyncio.wait_for(self.task, 5)
        finally:
            self.agent.close()

    async def run(self, attempt: int, **fields: Any) -> dict[str, Any]:
        self.ws.push(json.loads(assign(attempt, **fields)))
        [result] = await wait_until(lambda: self.ws.of("finished", attempt))
        return result


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.asyncio
async def test_it_runs_a_real_process_and_reports_its_output_and_exit(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=py("print(6*7)"))

        assert [f["type"] for f in s.ws.sent if f.get("attempt") == 1] == [
            "accepted",
            "started",
            "log",
            "finished",
        ]
        assert s.ws.of("log", 1) == [
            {"type": "log", "attempt": 1, "seq": 0, "stream": "stdout", "data": "42\n"}
        ]
        assert result["status"] == "succeeded"
        assert (result["exit_code"], result["reason"], result["output_bytes"]) == (0, "", 3)
        assert result["started_at"] <= result["finished_at"]
        assert s.ws.of("started", 1)[0]["pid"] > 0

        assert agent.load_spool(tmp_path) == [result]
        s.ws.push({"type": "ack", "attempt": 1})
        await wait_until(lambda: agent.load_spool(tmp_path) == [])


@pytest.mark.asyncio
async def test_it_reports_a_missing_executable_as_failed_with_cannot_start(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=["nosuchcmd-for-agent-tests", "x"])

    assert result["status"] == "failed"
    assert result["exit_code"] is None
    assert result["reason"] == "cannot start: No such file or directory (nosuchcmd-for-agent-tests)"
    assert result["started_at"] is None
    assert s.ws.of("started", 1) == []


@pytest.mark.asyncio
async def test_it_reports_a_missing_working_directory_as_cannot_start(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=["true"], cwd=str(tmp_path / "nowhere"))

    assert result["reason"] == f"cannot start: No such file or directory ({tmp_path / 'nowhere'})"


@pytest.mark.asyncio
async def test_a_timeout_kills_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=None, shell="sleep 1000 & sleep 1000", timeout=1)
        pgid = s.ws.of("started", 1)[0]["pid"]

        assert result["status"] == "timed_out"
        assert result["reason"] == "timed out after 1s"
        assert result["exit_code"] == -15
        assert result["finished_at"] - result["started_at"] < 5
        await wait_until(lambda: group_is_gone(pgid), timeout=5)
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)


@pytest.mark.asyncio
async def test_a_process_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.3)
    async with Session(tmp_path) as s:
        result = await s.run(
            1, argv=None, shell="trap '' TERM; sleep 1000 & sleep 1000", timeout=0.5
        )
        pgid = s.ws.of("started", 1)[0]["pid"]

    assert (result["status"], result["exit_code"]) == ("timed_out", -9)
    await wait_until(lambda: group_is_gone(pgid), timeout=5)


@pytest.mark.asyncio
async def test_leftover_background_children_do_not_keep_an_attempt_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    async with Session(tmp_path) as s:
        # The background sleep holds stdout open; the attempt still ends with its leader.
        result = await s.run(1, argv=None, shell="sleep 1000 & echo done", timeout=None)
        pgid = s.ws.of("started", 1)[0]["pid"]

    assert (result["status"], s.ws.output(1)) == ("succeeded", "done\n")
    await wait_until(lambda: group_is_gone(pgid), timeout=5)


@pytest.mark.asyncio
async def test_cancel_stops_a_running_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    async with Session(tmp_path) as s:
        s.ws.push(json.loads(assign(1, argv=["sleep", "1000"])))
        await wait_until(lambda: s.ws.of("started", 1))
        s.ws.push({"type": "cancel", "attempt": 1})
        [result] = await wait_until(lambda: s.ws.of("finished", 1))

    assert (result["status"], result["reason"], result["exit_code"]) == (
        "cancelled",
        "cancelled",
        -15,
    )


@pytest.mark.asyncio
async def test_output_past_the_cap_is_drained_and_counted_but_not_sent(tmp_path: Path) -> None:
    async with Session(tmp_path, log_limit_bytes=100_000) as s:
        result = await s.run(1, argv=py("import sys; sys.stdout.write('x' * 5_000_000)"))

    sent = sum(len(f["data"]) for f in s.ws.of("log", 1))
    assert sent == 100_000
    assert result["truncated"] is True
    assert result["output_bytes"] == 5_000_000
    assert (result["status"], result["exit_code"]) == ("succeeded", 0)
    assert result["last_seq"] == len(s.ws.of("log", 1)) - 1
    # Batched: a handful of frames, not one per read or per line.
    assert len(s.ws.of("log", 1)) <= 4


@pytest.mark.asyncio
async def test_stdout_and_stderr_are_reported_separately(tmp_path: Path) -> None:
    code = "import sys; print('to out'); sys.stdout.flush(); print('to err', file=sys.stderr)"
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=py(code))

    assert s.ws.output(1, "stdout") == "to out\n"
    assert s.ws.output(1, "stderr") == "to err\n"
    assert [f["seq"] for f in s.ws.of("log", 1)] == list(range(len(s.ws.of("log", 1))))
    assert result["output_bytes"] == 14


@pytest.mark.asyncio
async def test_the_process_sees_task_env_and_scheduler_variables(tmp_path: Path) -> None:
    code = (
        "import os; print(' '.join(os.environ[k] for k in ('GREETING', 'SCHEDULER_RUN_ID',"
        " 'SCHEDULER_ATTEMPT_ID', 'SCHEDULER_TASK_NAME', 'PATH') if k in os.environ))"
    )
    async with Session(tmp_path) as s:
        await s.run(4, argv=py(code), env={"GREETING": "hello"})

    words = s.ws.output(4).split()
    assert words[:4] == ["hello", "104", "4", "answer"]
    assert len(words) == 5  # PATH from the agent's own environment is kept


@pytest.mark.asyncio
async def test_a_shell_line_runs_through_bin_sh_with_stdin_closed(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=None, shell="cat; echo hi | tr a-z A-Z; exit 3")

    assert s.ws.output(1) == "HI\n"
    assert (result["status"], result["reason"]) == ("failed", "exit code 3")


@pytest.mark.asyncio
async def test_a_restarted_agent_replays_unacknowledged_results(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        first = await s.run(1, argv=["true"])

    async with Session(tmp_path) as again:
        await wait_until(lambda: again.ws.of("finished", 1))

    assert again.ws.of("finished", 1) == [first]


# --------------------------------------------------------------------------
# Shell: Agent.run() against a real websocket server


class WsMaster:
    """A tiny master on a free port: answers each frame through `respond`, records all."""

    def __init__(self, respond: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        self.respond = respond
        self.received: list[dict[str, Any]] = []
        self.close_codes: list[int | None] = []

    async def __aenter__(self) -> WsMaster:
        from websockets.asyncio.server import serve

        self.server = await serve(self._handler, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                decoded = json.loads(message)
                for frame in decoded if isinstance(decoded, list) else [decoded]:
                    self.received.append(frame)
                    for reply in self.respond(frame):
                        await ws.send(json.dumps(reply))
        self.close_codes.append(ws.close_code)

    def of(self, kind: str, attempt: int | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.received
            if f["type"] == kind and (attempt is None or f.get("attempt") == attempt)
        ]


def start_agent(url: str, state_dir: Path, drain_timeout: float) -> tuple[Agent, asyncio.Task]:
    config = AgentConfig(
        servers=(url,), name="node-1", capacity=2, state_dir=state_dir, drain_timeout=drain_timeout
    )
    worker = Agent(config, "credential", hostname="host-1")
    return worker, asyncio.create_task(worker.run())


def acking(first_assign: dict[str, Any], **welcome: Any) -> Callable:
    """A master that welcomes, assigns `first_assign` once, and acks every result."""

    def respond(frame: dict[str, Any]) -> list[dict[str, Any]]:
        if frame["type"] == "hello":
            return [{**WELCOME, **welcome}, first_assign]
        if frame["type"] == "finished":
            return [{"type": "ack", "attempt": frame["attempt"]}]
        return []

    return respond


@pytest.mark.asyncio
async def test_sigterm_drains_rejects_new_work_lets_the_command_finish_and_exits_0(
    tmp_path: Path,
) -> None:
    respond = acking(json.loads(assign(1, argv=["sleep", "0.5"], env={})))

    def master(frame: dict[str, Any]) -> list[dict[str, Any]]:
        # The master only learns of the drain from the agent's immediate heartbeat.
        if frame["type"] == "heartbeat" and frame["draining"]:
            return [json.loads(assign(2, argv=["true"]))]
        return respond(frame)

    async with WsMaster(master) as m:
        worker, task = start_agent(m.url, tmp_path, drain_timeout=10)
        await wait_until(lambda: m.of("started", 1))
        # A real SIGTERM to this process, handled by the handler run() installed; the
        # guard keeps a missing handler from killing the test run.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

        code = await asyncio.wait_for(task, 10)
        elapsed = time.monotonic() - started
        await wait_until(lambda: m.close_codes)

    assert code == 0
    assert elapsed < 5  # it left when the result was acked, not at the drain timeout
    assert [f["type"] for f in m.received] == [
        "hello",
        "accepted",
        "started",
        "heartbeat",
        "rejected",
        "finished",
    ]
    assert m.of("hello")[0]["draining"] is False
    assert m.of("heartbeat") == [{"type": "heartbeat", "running": [1], "draining": True}]
    assert m.of("rejected") == [{"type": "rejected", "attempt": 2, "reason": "agent is draining"}]
    [result] = m.of("finished", 1)
    assert (result["status"], result["exit_code"], result["reason"]) == ("succeeded", 0, "")
    assert m.close_codes == [1000]  # the agent closed the socket itself
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.asyncio
async def test_a_drain_timeout_kills_the_command_and_reports_it_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    respond = acking(json.loads(assign(1, argv=["sleep", "30"])))

    async with WsMaster(respond) as m:
        worker, task = start_agent(m.url, tmp_path, drain_timeout=1)
        [started_frame] = await wait_until(lambda: m.of("started", 1))
        started = time.monotonic()
        worker.request_stop()

        code = await asyncio.wait_for(task, 10)
        elapsed = time.monotonic() - started

    assert code == 0
    assert 1 <= elapsed < 5
    [result] = m.of("finished", 1)
    assert (result["status"], result["exit_code"], result["reason"]) == (
        "lost",
        -15,
        "agent shut down: drain timeout of 1s passed",
    )
    await wait_until(lambda: group_is_gone(started_frame["pid"]), timeout=5)
    assert list((tmp_path / "spool").iterdir()) == []  # acked before the exit


@pytest.mark.asyncio
async def test_a_second_stop_request_kills_without_waiting_for_the_drain_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    respond = acking(json.loads(assign(1, argv=None, shell="trap '' TERM; sleep 30")))

    async with WsMaster(respond) as m:
        worker, task = start_agent(m.url, tmp_path, drain_timeout=30)
        [started_frame] = await wait_until(lambda: m.of("started", 1))
        worker.request_stop()
        await wait_until(lambda: m.of("heartbeat"))
        worker.request_stop()

        code = await asyncio.wait_for(task, 10)

    assert code == 0
    [result] = m.of("finished", 1)
    # The shell ignores SIGTERM, so the kill escalated to SIGKILL after the grace.
    assert (result["status"], result["exit_code"], result["reason"]) == (
        "lost",
        -9,
        "agent shut down: killed by a second signal during the drain",
    )
    await wait_until(lambda: group_is_gone(started_frame["pid"]), timeout=5)


@pytest.mark.asyncio
async def test_it_self_fences_when_the_master_stays_away_and_spools_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    respond = acking(json.loads(assign(1, argv=["sleep", "30"])), fence_after_s=0.5)

    async with WsMaster(respond) as m:
        worker, task = start_agent(m.url, tmp_path, drain_timeout=0.5)
        [started_frame] = await wait_until(lambda: m.of("started", 1))
        m.server.close()  # drops the socket and refuses every reconnect
        await m.server.wait_closed()

        [result] = await wait_until(lambda: agent.load_spool(tmp_path), timeout=10)
        await wait_until(lambda: group_is_gone(started_frame["pid"]), timeout=5)
        assert (result["status"], result["exit_code"], result["reason"]) == (
            "lost",
            -15,
            "self-fenced: no contact with the master for 0.5s",
        )
        assert m.of("finished") == []

        worker.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    assert agent.load_spool(tmp_path) == [result]  # replayed by the next start


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [4403, 4409])
async def test_it_exits_3_and_stays_away_when_revoked_or_replaced(
    tmp_path: Path, code: int
) -> None:
    from websockets.asyncio.server import serve

    hellos: list[dict[str, Any]] = []

    async def handler(ws: Any) -> None:
        hellos.append(json.loads(await ws.recv()))
        await ws.send(json.dumps(WELCOME))
        await ws.close(code, "revoked" if code == 4403 else "another agent took over")

    async with serve(handler, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        _, task = start_agent(url, tmp_path, drain_timeout=1)
        assert await asyncio.wait_for(task, 10) == 3

    # Reconnecting would fight the other agent (or the revocation): one hello only.
    assert len(hellos) == 1


# --- merges (fan-in) ----------------------------------------------------------------

MERGE = {"argv": ["sort"], "shell": None, "outputs": "/api/agent/attempts/9/shards/"}


def test_a_merge_fetches_its_inputs_before_it_starts() -> None:
    core = online(make_core())

    out = core.receive(assign(9, argv=None, shard_index=3, shard_count=3, merge=MERGE))

    assert out == [
        Send({"type": "accepted", "attempt": 9}),
        agent.FetchShardOutputs(9, "/api/agent/attempts/9/shards/", 3),
    ]
    assert core.running_ids == [9]
    [start] = core.shard_outputs_fetched(9, "/state/merge/9/shards", "/state/merge/9/stdin", 1.0)
    assert start == StartProcess(
        9,
        ["sort"],
        {
            "K": "V",
            "SCHEDULER_RUN_ID": "109",
            "SCHEDULER_ATTEMPT_ID": "9",
            "SCHEDULER_TASK_NAME": "answer",
            "SCHEDULER_SHARD_INDEX": "3",
            "SCHEDULER_SHARD_COUNT": "3",
            "SCHEDULER_SHARD_OUTPUTS": "/state/merge/9/shards",
        },
        None,
        None,
        "/state/merge/9/stdin",
    )


def test_a_merge_whose_inputs_cannot_be_fetched_fails_with_the_reason() -> None:
    core = online(make_core())
    core.receive(assign(9, argv=None, shard_count=2, merge=MERGE))

    out = core.shard_outputs_failed(9, "shard 1: HTTP 403", 1_800_000_000.0)

    [spool, send] = out
    assert isinstance(spool, WriteSpool)
    assert send.frame["status"] == "failed"
    assert send.frame["reason"] == "cannot fetch shard outputs: shard 1: HTTP 403"
    assert core.running_ids == []


def test_a_merge_cancelled_while_it_fetches_never_starts() -> None:
    core = online(make_core())
    core.receive(assign(9, argv=None, shard_count=2, merge=MERGE))
    assert core.receive('{"type": "cancel", "attempt": 9}') == [KillProcess(9)]

    out = core.shard_outputs_fetched(9, "/d", "/d/stdin", 1_800_000_000.0)

    assert [type(o) for o in out] == [WriteSpool, Send]
    assert out[1].frame["status"] == "cancelled"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"merge": {**MERGE, "argv": None}}, "merge: exactly one of argv and shell must be set"),
        ({"merge": {**MERGE, "outputs": "http://elsewhere/"}}, "merge.outputs must be a path"),
        ({"argv": ["true"], "merge": MERGE}, "a merge carries its command in merge"),
    ],
)
def test_it_rejects_a_bad_merge_assign(overrides: dict, reason: str) -> None:
    core = online(make_core())
    out = core.receive(assign(9, **{"argv": None, **overrides}))
    [send] = out
    frame = send.frame
    assert frame["type"] == "rejected"
    assert frame["reason"].startswith(f"invalid assign: {reason}")


def test_an_agent_without_merges_refuses_a_merge_assign_instead_of_running_it() -> None:
    # What an agent from before merges sees: no command in argv or shell (it
    # ignores the merge object it does not know), so it refuses.
    core = online(make_core())
    frame = json.loads(assign(9, argv=None, merge=MERGE))
    del frame["merge"]
    out = core.receive(json.dumps(frame))
    assert out == [
        Send(
            {
                "type": "rejected",
                "attempt": 9,
                "reason": "invalid assign: exactly one of argv and shell must be set",
            }
        )
    ]


@pytest.fixture
def shard_server():
    """An HTTP server answering like the master's merge-input endpoint: /m/ two
    framed shards ('out 0', then an empty one, then 'é 2'), /short/ an answer
    cut inside shard 1, /odd/ a wrong frame header, anything else 403; it
    records the Authorization header it got."""
    seen: list[str] = []
    frames = b"0 6\nout 0\n1 0\n2 5\n\xc3\xa9 2\n"
    bodies = {
        "/m/": (200, frames),
        "/short/": (200, b"0 6\nout 0\n1 9\nout"),
        "/odd/": (200, b"0 6\nout 0\nX 1\n"),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            status, body = bodies.get(self.path, (403, b'{"error": "no"}'))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_fetching_shard_outputs_writes_one_file_each_and_the_joined_stdin(
    tmp_path: Path, shard_server
) -> None:
    url, seen = shard_server

    stdin = agent.fetch_shard_outputs(url, "wkr_x", "/m/", 3, tmp_path / "9")

    assert stdin.read_bytes() == "out 0\né 2\n".encode()
    shards_dir = tmp_path / "9" / "shards"
    assert sorted(p.name for p in shards_dir.iterdir()) == ["0", "1", "2"]
    assert (shards_dir / "1").read_bytes() == b""
    assert (shards_dir / "2").read_text() == "é 2\n"
    assert seen == ["Bearer wkr_x"]  # one request for every shard


@pytest.mark.parametrize(
    ("path", "count", "message"),
    [
        ("/refused/", 3, r'^HTTP 403 \{"error": "no"\}$'),
        ("/short/", 2, r"^shard 1: the answer ended early$"),
        ("/odd/", 2, r"^shard 1: bad frame header b'X 1\\n'$"),
        ("/m/", 4, r"^shard 3: bad frame header b''$"),
    ],
)
def test_a_refused_or_broken_answer_is_a_fetch_error_naming_the_shard(
    tmp_path: Path, shard_server, path: str, count: int, message: str
) -> None:
    url, _ = shard_server
    with pytest.raises(agent.ShardFetchError, match=message):
        agent.fetch_shard_outputs(url, "wkr_x", path, count, tmp_path / "9")


def test_a_stopped_fetch_ends_before_its_next_shard(tmp_path: Path, shard_server) -> None:
    # A cancel while the merge downloads sets the event; the thread stops at
    # the next block or shard instead of reading every shard first.
    url, _ = shard_server
    stop = threading.Event()
    stop.set()
    with pytest.raises(agent.ShardFetchError, match="^stopped before shard 0$"):
        agent.fetch_shard_outputs(url, "wkr_x", "/m/", 3, tmp_path / "9", stop)


@pytest.mark.asyncio
async def test_a_merge_downloads_its_inputs_from_the_server_it_is_connected_to(
    tmp_path: Path, shard_server
) -> None:
    url, seen = shard_server
    config = AgentConfig(servers=("http://first.invalid", url), name="node-1", state_dir=tmp_path)
    worker = Agent(config, "wkr_x", hostname="host-1")
    worker.rotation.failed()
    worker.rotation.failed()  # the first server is down: connected to the second
    ws = FakeSocket()
    task = asyncio.create_task(worker.serve(ws))
    try:
        ws.push(WELCOME)
        merge = {"argv": ["cat"], "shell": None, "outputs": "/m/"}
        ws.push(json.loads(assign(9, argv=None, shard_index=3, shard_count=3, merge=merge)))
        [result] = await wait_until(lambda: ws.of("finished", 9))
    finally:
        await ws.close()
        await asyncio.wait_for(task, 5)
        worker.close()

    assert (result["status"], ws.output(9)) == ("succeeded", "out 0\né 2\n")
    assert seen == ["Bearer wkr_x"]


# --------------------------------------------------------------------------
# Secrets: given to the command, masked in what leaves the node


def test_it_gives_the_command_its_secrets_after_its_env() -> None:
    core = online(make_core())

    out = core.receive(assign(5, secret_env={"API_TOKEN": "hunter2-xyz"}))

    assert out[1] == StartProcess(
        5, ["python", "-c", "print(1)"], env_for(5, K="V", API_TOKEN="hunter2-xyz"), None, None
    )


def test_it_masks_a_secret_split_across_two_reads_and_at_the_end() -> None:
    core = running(online(make_core()), 5, secret_env={"API_TOKEN": "hunter2-xyz", "PIN": "12"})

    core.output(5, "stdout", b"token=hunt")
    first = core.flush_logs()
    core.output(5, "stdout", b"er2-xyz; pin 12\nlast: hunter2")
    second = core.flush_logs()
    end = core.process_exited(5, 0, 1002.5)

    assert first == [
        Send({"type": "log", "attempt": 5, "seq": 0, "stream": "stdout", "data": "token="})
    ]
    # Held back: "hunter2" could still be the start of the secret.
    assert second == [
        Send(
            {
                "type": "log",
                "attempt": 5,
                "seq": 1,
                "stream": "stdout",
                "data": "***; pin 12\nlast: ",
            }
        )
    ]
    # A value shorter than 3 characters ("12") is not masked; at the end the
    # held-back start of a value is masked too: the rest may just not have come.
    assert end[0] == Send(
        {"type": "log", "attempt": 5, "seq": 2, "stream": "stdout", "data": "***"}
    )


@pytest.mark.parametrize(
    ("values", "pieces", "expected"),
    [
        # A value ending with what begins it, at the end of a piece: masked
        # whole, not held back from inside it.
        (["s3cr3ts"], ["token: s3cr3ts", " done\n"], "token: *** done\n"),
        (["abcab"], ["x abcab", "c\n"], "x ***c\n"),
        # Overlapping occurrences: the first is masked, as in one piece.
        (["abcab"], ["x abcab", "cab\n"], "x ***cab\n"),
        # One value's end is another's start.
        (["hunter2", "r2d2x"], ["foo hunter2", "\n"], "foo ***\n"),
        (["hunter2", "r2d2x"], ["foo hunter2", "d2x\n"], "foo ***d2x\n"),
        (["hunter2", "r2d2x"], ["foo hunte", "r2d2x\n"], "foo ***d2x\n"),
        # A longer value the next piece completes wins, as in one piece.
        (["abc", "abcdef"], ["x abc", "def\n"], "x ***\n"),
        (["abc", "abcdef"], ["x abc", "dx\n"], "x ***dx\n"),
        # At the end, a held-back start of 3 characters or more is masked; a
        # shorter one is left, like a value that short.
        (["hunter2"], ["foo hunt"], "foo ***"),
        (["hunter2"], ["foo hu"], "foo hu"),
        (["abc", "abcdef"], ["x abc"], "x ***"),
    ],
)
def test_the_masker_masks_values_however_the_output_is_split(
    values: list[str], pieces: list[str], expected: str
) -> None:
    masker = agent.Masker(values)

    out = "".join(masker.feed(p) for p in pieces) + masker.feed("", final=True)

    assert out == expected


def mask_at_once(text: str, values: list[str]) -> str:
    """What the Masker must give, by the rule itself, one position at a time:
    the longest value starting here is masked; an end of the text that may be
    the start of a value is masked if 3 characters or more."""
    values = [v for v in values if len(v) >= agent.MIN_MASKED_LENGTH]
    out, i = [], 0
    while i < len(text):
        rest = text[i:]
        if any(len(v) > len(rest) and v.startswith(rest) for v in values):
            out.append("***" if len(rest) >= agent.MIN_MASKED_LENGTH else rest)
            break
        match = max((v for v in values if rest.startswith(v)), key=len, default="")
        out.append("***" if match else rest[0])
        i += len(match) or 1
    return "".join(out)


def random_masking_cases(rng: random.Random, count: int):
    alphabet = "abc"  # few letters: values overlap themselves and each other
    fixed = [
        ["abab"],
        ["aaa"],
        ["s3cr3ts"],
        ["abcab", "bca"],
        ["hunter2", "r2d2x"],
        ["abc", "abcdef", "cde"],
        ["aba", "bab", "ab"],  # "ab" is too short to mask
    ]
    for n in range(count):
        if n < len(fixed):
            values = fixed[n]
        else:
            values = [
                "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))
                for _ in range(rng.randint(1, 3))
            ]
        letters = alphabet + "".join(values) + "x "
        parts = []
        for _ in range(rng.randint(1, 6)):
            value = rng.choice(values)
            parts.append(rng.choice([value, value[: rng.randint(1, len(value))], value[1:]]))
            parts.append("".join(rng.choice(letters) for _ in range(rng.randint(0, 4))))
        yield values, "".join(parts)


def test_the_masker_output_never_holds_a_value_wherever_the_pieces_are_cut() -> None:
    rng = random.Random(20240611)
    for values, text in random_masking_cases(rng, 400):
        masked = [v for v in values if len(v) >= agent.MIN_MASKED_LENGTH]
        expected = mask_at_once(text, values)
        # The same rule as the one regex the Masker uses, when the text ends
        # with no value cut short.
        pattern = "|".join(sorted(masked, key=len, reverse=True))
        whole = re.sub(pattern, "***", text + "\n") if masked else text + "\n"
        assert mask_at_once(text + "\n", values) == whole
        splits = [[i] for i in range(len(text) + 1)]
        splits += [sorted(rng.sample(range(len(text) + 1), min(4, len(text)))) for _ in range(20)]
        splits.append(list(range(len(text) + 1)))  # one character at a time
        for cuts in splits:
            bounds = [0, *cuts, len(text)]
            pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
            masker = agent.Masker(values)
            out = "".join(masker.feed(p) for p in pieces) + masker.feed("", final=True)
            assert out == expected, (values, text, cuts)
            assert not any(v in out for v in masked), (values, text, cuts)
            masker = agent.Masker(values)
            out = "".join(masker.feed(p) for p in pieces) + masker.feed("\n", final=True)
            assert out == whole, (values, text, cuts)


def test_a_secret_cut_by_the_log_limit_is_masked_at_the_end() -> None:
    core = running(
        online(make_core(), log_limit_bytes=12), 5, secret_env={"API_TOKEN": "hunter2-xyz"}
    )

    core.output(5, "stdout", b"token=hunter2-xyz\n")
    out = core.process_exited(5, 0, 1002.5)

    assert [o.frame["data"] for o in out if o.frame["type"] == "log"] == ["token=***"]
    assert out[-1].frame["truncated"] is True


def test_it_never_logs_the_secret_values_of_a_frame_it_ignores(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = online(make_core())
    secret_env = {"API_TOKEN": "hunter2-xyz", "PIN": "42"}

    def broken(frame: dict[str, Any]) -> str | None:
        raise ValueError("a bug")

    with caplog.at_level("WARNING", logger="scheduler_agent"):
        # Not an integer attempt: refused by the schema, logged.
        core.receive(json.dumps({"secret_env": secret_env, "type": "assign", "attempt": "5"}))
        core.receive(json.dumps([[{"secret_env": "hunter2-xyz", "type": "assign"}]]))
        # Past the schema, an exception: logged.
        monkeypatch.setattr(agent, "_assign_problem", broken)
        core.receive(json.dumps({"secret_env": secret_env, **json.loads(assign(6))}))

    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        "ignoring frame from master (assign: field 'attempt' has the wrong type): "
        "{'secret_env': {'API_TOKEN': '***', 'PIN': '***'}, 'type': 'assign', 'attempt': '5'}",
        "ignoring frame from master (frame must be a JSON object): "
        "[{'secret_env': '***', 'type': 'assign'}]",
    ]
    assert messages[2].startswith(
        "ignoring malformed assign frame (a bug): "
        "{'secret_env': {'API_TOKEN': '***', 'PIN': '***'}, 'type': 'assign', 'attempt': 6, "
    )
    assert len(messages) == 3
    assert not any("hunter2" in m or "42" in m for m in messages)


def test_it_refuses_a_secret_env_that_is_not_names_to_strings() -> None:
    core = online(make_core())

    out = core.receive(assign(5, secret_env={"API_TOKEN": 7}))

    assert out == [
        Send(
            {
                "type": "rejected",
                "attempt": 5,
                "reason": "invalid assign: secret_env must map names to strings",
            }
        )
    ]


def test_commands_get_path_the_allow_list_and_passed_names_only() -> None:
    environ = {
        b"PATH": b"/usr/bin",
        b"HOME": b"/home/a",
        b"LC_TIME": b"C",
        b"SECRET_KEY": b"django-key",
        b"DATABASE_URL": b"postgres://u:p@h/db",
        b"MY_PROXY": b"http://proxy",
    }

    assert agent.command_environ(environ, ["MY_PROXY"]) == {
        b"PATH": b"/usr/bin",
        b"HOME": b"/home/a",
        b"LC_TIME": b"C",
        b"MY_PROXY": b"http://proxy",
    }
    assert b"SECRET_KEY" not in agent.command_environ(environ)
