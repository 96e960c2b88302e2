"""An agent given several servers, and agents riding out a master restart:
real `serve` processes and real agent processes.

The scale-out test runs two servers of one install on the real PostgreSQL
and Redis (tests/engines.py); it skips on a laptop without them, fails in CI.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines import ScaleOut
from tests.harness import FAST_SETTINGS, Agent, Master, free_port, spawn_agent, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# A command that is still running when the server dies, then prints.
SLEEP_THEN_DONE = "sleep 3; echo done"


def connections(agent: Agent) -> list[str]:
    """The websocket URLs the agent connected to, in order."""
    return re.findall(r"connected to (\S+)", agent.log())


def welcomes(agent: Agent) -> int:
    return agent.log().count("connected as worker")


def running(master: Master, run_id: int) -> bool:
    return any(a["status"] == "running" for a in master.run_of(run_id)["attempts"])


def test_an_agent_whose_first_server_is_dead_goes_online_on_the_next(
    master, start_agent, tmp_path: Path
):
    dead = f"http://127.0.0.1:{free_port()}"
    agent = start_agent("second-choice", server=dead, extra=("--server", master.url))

    task = master.create_task(name="answer", command="echo 42", shell=True)
    run = master.wait_final(master.trigger(task["id"])["id"])

    assert run["status"] == "succeeded"
    (attempt,) = run["attempts"]
    assert (attempt["worker"], attempt["output"]) == ("second-choice", "42\n")
    log = agent.log()
    # Enrollment, then the websocket: each gives the dead one two tries, then moves.
    assert log.count(f"server {dead} failed 2 times in a row; moving to {master.url}") == 2
    assert connections(agent) == [f"ws://127.0.0.1:{master.port}/ws/agent/"]
    credential = json.loads((agent.state_dir / "credential.json").read_text())
    assert credential["server"] == master.url


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[Master, Master]]:
    """Two `serve` processes of one install: one database, one Redis prefix."""
    scale = ScaleOut.create()
    servers: list[Master] = []
    try:
        # 15 s lost-after, as the other restart tests: a 14 s fence leaves the
        # agent time to move even on a loaded machine.
        settings = {**FAST_SETTINGS, "SCHEDULER_LOST_AFTER_S": "15", **scale.env}
        for name in ("a", "b"):
            servers.append(Master.launch(tmp_path / name, **settings))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.release()
        scale.drop()


@pytest.mark.scale_out
def test_an_agent_moves_to_the_other_server_when_its_own_dies_and_the_run_is_not_retried(
    two_servers, tmp_path: Path
):
    a, b = two_servers
    agent = spawn_agent(
        f"{a.url},{b.url}", a.manage("enrollment-token", "--auto-approve"), tmp_path, name="mover"
    )
    try:
        wait_for(lambda: welcomes(agent) == 1, what="the agent welcomed")
        assert connections(agent) == [f"ws://127.0.0.1:{a.port}/ws/agent/"]
        task = a.create_task(name="spanning", command=SLEEP_THEN_DONE, shell=True, max_retries=2)
        run_id = a.trigger(task["id"])["id"]
        wait_for(lambda: running(a, run_id), what="the command running")
        before = connections(agent)
        assert set(before) == {f"ws://127.0.0.1:{a.port}/ws/agent/"}

        a.stop(signal.SIGKILL)
        run = b.wait_final(run_id, timeout=60)

        assert run["status"] == "succeeded"
        (attempt,) = run["attempts"]
        assert (attempt["status"], attempt["try_number"], attempt["worker"]) == (
            "succeeded",
            1,
            "mover",
        )
        assert attempt["output"] == "done\n"
        assert f"server {a.url} failed 2 times in a row; moving to {b.url}" in agent.log()
        assert connections(agent)[len(before) :] == [f"ws://127.0.0.1:{b.port}/ws/agent/"]
    finally:
        agent.stop()


# The defaults of scheduler_site/settings.py, not the suite's fast ones: a
# restart as long as an upgrade's must not kill what runs.
@pytest.mark.master_env(SCHEDULER_HEARTBEAT_S="5", SCHEDULER_LOST_AFTER_S="60")
def test_a_command_survives_a_30_s_master_outage_with_the_default_liveness_settings(
    master, start_agent
):
    agent = start_agent("patient")
    task = master.create_task(
        name="long", command="sleep 40; echo survived", shell=True, max_retries=2
    )
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: running(master, run_id), what="the command running")

    welcomed = welcomes(agent)
    master.stop(signal.SIGKILL)
    time.sleep(30)  # the outage itself: an upgrade with migrations
    master.start()
    back = time.monotonic()
    wait_for(lambda: welcomes(agent) > welcomed, timeout=15, what="the agent back")
    reconnected_after = time.monotonic() - back
    run = master.wait_final(run_id, timeout=60)

    assert run["status"] == "succeeded"
    (attempt,) = run["attempts"]
    assert (attempt["status"], attempt["try_number"], attempt["output"]) == (
        "succeeded",
        1,
        "survived\n",
    )
    # fence_after_s = max(60 - 2*5, 60/2) = 50 s; while the command ran, every
    # wait between reconnect attempts was at most 50/10 = 5 s.
    waits = [float(s) for s in re.findall(r"reconnecting to \S+ in ([\d.]+)s", agent.log())]
    print(f"\nback {reconnected_after:.1f}s after the restart; waits {waits}")
    assert waits and max(waits) <= 5.0
    assert "self-fenced" not in agent.log()
