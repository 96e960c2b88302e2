"""The agent's shell: batching on the socket, processes without a thread each, the
watchdog that outlives a killed agent, and the spool file.

Real processes throughout; the master is a fake socket, or a tiny websocket
server when the agent runs as its own process so that it can be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError

from tests.harness import AGENT, alive, proc_stat, wait_for
from tests.test_agent_core import (
    WELCOME,
    FakeSocket,
    Session,
    WsMaster,
    acking,
    assign,
    finished,
    group_is_gone,
    py,
    wait_until,
)
from workers_app import agent
from workers_app.agent import Agent, AgentConfig, Spool, Watchdog, encode_messages


def watchdogs_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(proc_stat(int(entry.name))[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid and b"scheduler-agent-watchdog" in cmdline:
            found.append(int(entry.name))
    return found


def texts(frames: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(f, separators=(",", ":")) for f in frames]


# --------------------------------------------------------------------------
# Messages: what one websocket message carries


A = {"type": "accepted", "attempt": 1}
S = {"type": "started", "attempt": 1, "pid": 4242, "started_at": 1000.0}
F = finished(1)


def test_it_sends_one_frame_per_message_with_protocol_1() -> None:
    assert encode_messages([A, S, F], 1, 10**6) == [(t, 1) for t in texts([A, S, F])]


def test_it_sends_a_json_array_of_frames_with_protocol_2() -> None:
    a, s, f = texts([A, S, F])

    assert encode_messages([A, S, F], 2, 10**6) == [(f"[{a},{s},{f}]", 3)]
    assert encode_messages([A], 2, 10**6) == [(a, 1)]  # a lone frame is not wrapped


def test_it_splits_an_array_at_the_masters_limit() -> None:
    a, s, f = texts([A, S, F])
    limit = len(f"[{a},{s}]")

    assert encode_messages([A, S, F], 2, limit) == [(f"[{a},{s}]", 2), (f, 1)]
    assert encode_messages([A, S, F], 2, limit - 1) == [(a, 1), (s, 1), (f, 1)]


def test_it_counts_the_limit_in_bytes_not_characters() -> None:
    log = {"type": "log", "attempt": 1, "seq": 0, "stream": "stdout", "data": "é" * 100}
    [text] = texts([log])
    text = text.replace("\\u00e9", "é")
    bytes_of_two = 2 * len(text.encode()) + 3

    assert encode_messages([log, log], 2, bytes_of_two) == [(f"[{text},{text}]", 2)]
    assert encode_messages([log, log], 2, bytes_of_two - 1) == [(text, 1), (text, 1)]


def test_a_frame_over_the_limit_still_leaves_alone() -> None:
    a, s, f = texts([A, S, F])

    assert encode_messages([A, F, S], 2, 10) == [(a, 1), (f, 1), (s, 1)]


def test_an_array_carries_at_most_max_frames_per_message() -> None:
    frames = [{"type": "accepted", "attempt": n} for n in range(agent.MAX_FRAMES_PER_MESSAGE + 1)]

    assert [count for _, count in encode_messages(frames, 2, 10**9)] == [
        agent.MAX_FRAMES_PER_MESSAGE,
        1,
    ]


# --------------------------------------------------------------------------
# The send loop


@pytest.mark.asyncio
async def test_it_sends_accepted_and_started_of_a_command_in_one_message(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        result = await s.run(1, argv=["true"])

    pid = s.ws.of("started", 1)[0]["pid"]
    assert s.ws.messages[0]["type"] == "hello"  # alone, before the welcome
    # The result of so short a command may well join them.
    assert s.ws.messages[1][:2] == [
        {"type": "accepted", "attempt": 1},
        {"type": "started", "attempt": 1, "pid": pid, "started_at": result["started_at"]},
    ]
    assert s.ws.sent[-1] == result


@pytest.mark.asyncio
async def test_it_sends_single_frames_to_a_protocol_1_master(tmp_path: Path) -> None:
    async with Session(tmp_path, protocol=1) as s:
        await s.run(1, argv=["true"])
        await s.run(2, argv=py("print('x')"))

    assert all(isinstance(message, dict) for message in s.ws.messages)
    assert [f["type"] for f in s.ws.sent if f.get("attempt") == 2] == [
        "accepted",
        "started",
        "log",
        "finished",
    ]


@pytest.mark.asyncio
async def test_it_sends_every_result_without_waiting_for_an_ack(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        for attempt in (1, 2, 3):
            s.ws.push(json.loads(assign(attempt, argv=["true"])))
        await wait_until(lambda: len(s.ws.of("finished")) == 3)

    assert sorted(f["attempt"] for f in s.ws.of("finished")) == [1, 2, 3]
    assert agent.load_spool(tmp_path) == sorted(s.ws.of("finished"), key=lambda f: f["attempt"])


class BreakingSocket(FakeSocket):
    """A master that welcomes and assigns on the hello; then the connection breaks."""

    async def send(self, message: str) -> None:
        if self.messages:
            raise ConnectionClosedError(None, None)
        await super().send(message)
        self.push(WELCOME)
        self.push(json.loads(assign(1, argv=["true"])))


@pytest.mark.asyncio
async def test_frames_of_a_batch_that_did_not_leave_go_after_the_next_welcome(
    tmp_path: Path,
) -> None:
    config = AgentConfig(servers=("http://master.invalid",), name="node-1", state_dir=tmp_path)
    worker = Agent(config, "credential", hostname="host-1")
    broken = BreakingSocket()
    await asyncio.wait_for(worker.serve(broken), 5)  # ends when [accepted, started] fails
    await wait_until(lambda: worker.core.unacked_ids == [1])

    again = FakeSocket()
    again.push(WELCOME)
    serving = asyncio.create_task(worker.serve(again))
    await wait_until(lambda: again.of("finished", 1))
    await again.close()
    await asyncio.wait_for(serving, 5)
    worker.close()

    assert [f["type"] for f in broken.sent] == ["hello"]
    assert again.sent[0]["spooled"] == [1]
    assert [f["type"] for f in again.sent[1:]] == ["accepted", "started", "finished"]


# --------------------------------------------------------------------------
# Processes


@pytest.mark.asyncio
async def test_a_command_holds_no_descriptor_but_its_own_three(tmp_path: Path) -> None:
    # fstat opens nothing, so only what the command inherited shows: no watchdog
    # pipe, no spool file, no socket of the agent.
    code = (
        "import os\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "    except OSError:\n"
        "        return False\n"
        "    return True\n"
        "print([fd for fd in range(4096) if is_open(fd)], os.readlink('/proc/self/fd/0'))"
    )
    async with Session(tmp_path) as s:
        s.agent.watchdog.start()
        await s.run(1, argv=py(code))

    assert s.ws.output(1) == "[0, 1, 2] /dev/null\n"


@pytest.mark.asyncio
async def test_it_waits_for_commands_without_a_thread_each(tmp_path: Path) -> None:
    async with Session(tmp_path) as s:
        threads = threading.active_count()
        for attempt in (1, 2, 3):
            s.ws.push(json.loads(assign(attempt, argv=["sleep", "0.5"])))
        await wait_until(lambda: len(s.ws.of("started")) == 3)
        during = threading.active_count()
        await wait_until(lambda: len(s.ws.of("finished")) == 3)

    assert during == threads
    assert [f["status"] for f in s.ws.of("finished")] == ["succeeded"] * 3


@pytest.mark.asyncio
async def test_it_falls_back_to_a_waiting_thread_without_pidfd_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    monkeypatch.setattr(agent, "KILL_GRACE_S", 0.5)
    async with Session(tmp_path) as s:
        failed = await s.run(1, argv=None, shell="exit 3")
        timed_out = await s.run(2, argv=["sleep", "1000"], timeout=0.3)

    assert (failed["status"], failed["exit_code"], failed["reason"]) == (
        "failed",
        3,
        "exit code 3",
    )
    assert (timed_out["status"], timed_out["exit_code"]) == ("timed_out", -15)


# --------------------------------------------------------------------------
# The watchdog


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "1000"], start_new_session=True)


def test_the_watchdog_kills_the_groups_it_lists_when_its_pipe_closes() -> None:
    watched, forgotten = sleeper(), sleeper()
    watchdog = Watchdog()
    watchdog.watch(watched.pid)
    watchdog.watch(forgotten.pid)
    watchdog.forget(forgotten.pid)

    watchdog.close()  # what the agent's death does too, however it dies

    try:
        assert watched.wait(timeout=5) == -signal.SIGKILL
        assert forgotten.poll() is None
    finally:
        for sleeping in (watched, forgotten):
            sleeping.kill()
            sleeping.wait()


def ignored_signals(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 64) if mask >> (number - 1) & 1}
    raise AssertionError("no SigIgn")


def test_the_watchdog_ends_with_its_agent_not_with_a_sigterm_to_everyone() -> None:
    watchdog = Watchdog()
    watchdog.start()
    try:
        expected = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
        wait_for(lambda: expected <= ignored_signals(watchdog.pid), timeout=10)
        assert os.getsid(watchdog.pid) == watchdog.pid  # no terminal's Ctrl-C either
    finally:
        watchdog.close()


@pytest.mark.asyncio
async def test_the_agent_restarts_a_dead_watchdog_and_tells_it_what_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Session(tmp_path) as s:
        s.ws.push(json.loads(assign(1, argv=["sleep", "1000"])))
        [started] = await wait_until(lambda: s.ws.of("started", 1))
        first = s.agent.watchdog.pid
        os.kill(first, signal.SIGKILL)

        await wait_until(lambda: s.agent.watchdog.restarts == 1)
        assert s.agent.watchdog.pid not in (None, first)
        # The new one knows the running group: its end (the agent's) kills it.
        s.agent.watchdog.close()
        [result] = await wait_until(lambda: s.ws.of("finished", 1))

    assert (result["status"], result["exit_code"]) == ("failed", -9)
    assert group_is_gone(started["pid"])
    assert any("the watchdog exited" in r.getMessage() for r in caplog.records)


@asynccontextmanager
async def agent_process(
    tmp_path: Path, command: str, *extra: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], WsMaster]]:
    """A real agent process, enrolled already, whose master assigns one shell command."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "credential.json").write_text(json.dumps({"credential": "c"}))
    respond = acking(json.loads(assign(1, argv=None, shell=command, env={})))
    async with WsMaster(respond) as master:
        with (tmp_path / "agent.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(AGENT), "--server", master.url, "--state-dir", str(state)]
                + list(extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            yield proc, master
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.asyncio
async def test_a_command_and_its_child_die_with_a_sigkilled_agent(tmp_path: Path) -> None:
    child_file = tmp_path / "child.pid"
    command = f"sleep 1000 & echo $! > {child_file}; wait"
    async with agent_process(tmp_path, command) as (proc, master):
        [started] = await wait_until(lambda: master.of("started", 1))
        child = int(await wait_until(lambda: child_file.exists() and child_file.read_text()))

        proc.kill()

        await wait_until(lambda: not alive(started["pid"]) and not alive(child), timeout=5)


@pytest.mark.asyncio
async def test_a_restarted_watchdog_still_kills_commands_of_a_sigkilled_agent(
    tmp_path: Path,
) -> None:
    async with agent_process(tmp_path, "exec sleep 1000") as (proc, master):
        [started] = await wait_until(lambda: master.of("started", 1))
        [first] = await wait_until(lambda: watchdogs_of(proc.pid))
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: watchdogs_of(proc.pid) not in ([], [first]))

        proc.kill()

        await wait_until(lambda: not alive(started["pid"]), timeout=5)


@pytest.mark.asyncio
async def test_a_clean_exit_leaves_no_process_behind(tmp_path: Path) -> None:
    # The leftover ignores SIGTERM and no longer holds the attempt's output, so the
    # attempt ends at once while its SIGKILL is still KILL_GRACE_S (5 s) away.
    leftover_file = tmp_path / "leftover.pid"
    command = f"trap '' TERM; sleep 1000 >/dev/null 2>&1 & echo $! > {leftover_file}"
    async with agent_process(tmp_path, command) as (proc, master):
        await wait_until(lambda: master.of("finished", 1))
        leftover = int(leftover_file.read_text())
        [watchdog] = watchdogs_of(proc.pid)
        assert alive(leftover)

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0

    assert not alive(watchdog)
    await wait_until(lambda: not alive(leftover), timeout=2)
    assert list((tmp_path / "state" / "spool").iterdir()) == []


# --------------------------------------------------------------------------
# The spool


def test_the_spool_keeps_results_until_they_are_acked_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool").mkdir()
    assert spool.open() == []
    spool.write(1, finished(1))
    spool.write(2, finished(2))
    spool.write(3, finished(3))
    spool.remove(2)
    spool.close()

    assert agent.load_spool(tmp_path) == [finished(1), finished(3)]
    again = Spool(tmp_path / "spool")
    assert again.open() == [finished(1), finished(3)]
    again.remove(1)
    again.remove(3)
    again.close()
    assert list((tmp_path / "spool").iterdir()) == []  # nothing waits: nothing left


def spool_of_one_result_then(tmp_path: Path, raw: bytes) -> Spool:
    """A spool holding the result of attempt 1, then these raw bytes; reopened."""
    (tmp_path / "spool").mkdir()
    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.write(1, finished(1))
    spool.close()
    with (tmp_path / "spool" / agent.SPOOL_FILE).open("ab") as file:
        file.write(raw)
    return Spool(tmp_path / "spool")


def test_a_line_torn_by_a_crash_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    # The agent died mid-write.
    again = spool_of_one_result_then(tmp_path, b'{"type":"finished","attempt":2,"sta')

    assert again.open() == [finished(1)]
    again.write(3, finished(3))
    again.close()

    assert agent.load_spool(tmp_path) == [finished(1), finished(3)]


def test_a_spool_line_without_an_attempt_id_is_skipped(tmp_path: Path) -> None:
    again = spool_of_one_result_then(
        tmp_path, b'{"type":"finished","attempt":"2"}\n{"type":"ack","attempt":null}\n'
    )

    assert again.open() == [finished(1)]
    again.close()


def test_results_an_older_agent_spooled_one_file_each_are_kept(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "5.json").write_text(json.dumps(finished(5)))
    (spool_dir / "6.json").write_text("{not json")

    spool = Spool(spool_dir)
    assert spool.open() == [finished(5)]
    spool.close()

    # Moved into the spool file; an unreadable one stays for a human, as before.
    assert sorted(p.name for p in spool_dir.iterdir()) == ["6.json", agent.SPOOL_FILE]
    assert agent.load_spool(tmp_path) == [finished(5)]


def test_the_spool_file_is_rewritten_when_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Spool, "COMPACT_BYTES", 2000)
    (tmp_path / "spool").mkdir()
    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.write(1, finished(1))  # stays unacked throughout
    for attempt in range(2, 200):
        spool.write(attempt, finished(attempt))
        spool.remove(attempt)

    size = (tmp_path / "spool" / agent.SPOOL_FILE).stat().st_size
    spool.close()

    assert size < 2000 + 2 * len(json.dumps(finished(1)))
    assert agent.load_spool(tmp_path) == [finished(1)]
