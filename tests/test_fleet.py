"""Liveness under load: a few hundred agents connecting at once all stay online.

Issue 6: with a thousand agents, heartbeats waited behind a thousand hellos on
the one database thread and the reaper took the server's own backlog for the
agents' silence (close 4408). Here 300 simulated agents (tests/fleet.py, the
real protocol over real websockets) connect at the same instant to a real
server whose lost timeout is 3 s, heartbeat for three lost timeouts, then run
a few hundred runs between them.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.fleet import Fleet
from tests.harness import FAST_SETTINGS, wait_for

pytestmark = pytest.mark.e2e

AGENTS = 300
RUNS = 300
LOST_AFTER_S = float(FAST_SETTINGS["SCHEDULER_LOST_AFTER_S"])


def _worker_states(master) -> Counter:
    response = master.api("GET", "workers")
    assert response.status_code == 200, response.text
    return Counter(worker["state"] for worker in response.json()["results"])


def _all_runs(master, task_id: int) -> list[dict]:
    runs, url = [], f"runs?task={task_id}&limit=200"
    while url:
        body = master.api("GET", url).json()
        runs += body["results"]
        # next is an absolute URL on the server the request went to.
        url = body["next"] and body["next"].removeprefix(f"{master.url}/api/")
    return runs


def _nothing_active(master) -> bool:
    state = master.api("GET", "scheduler").json()
    return state["runs_queued"] == 0 and state["runs_running"] == 0


def test_it_keeps_hundreds_of_agents_that_connect_at_once_online(master):
    fleet = Fleet(master.url, master.manage("enrollment-token", "--auto-approve"), AGENTS)
    fleet.register()
    with fleet:
        fleet.wait_welcomed(timeout=30)
        assert _worker_states(master) == {"online": AGENTS}

        # Three lost timeouts of heartbeats: a worker taken for silent in that
        # time is offline (or closed with 4408) at one of these looks.
        until = time.monotonic() + 3 * LOST_AFTER_S
        while time.monotonic() < until:
            assert _worker_states(master) == {"online": AGENTS}, fleet.stats.summary()
            time.sleep(0.5)

        task = master.create_task(name="noop", command="true")
        response = master.api("POST", "runs", json={"task": task["id"], "count": RUNS})
        assert response.status_code == 201, response.text
        wait_for(lambda: _nothing_active(master), timeout=30, what="every run to finish")
        runs = _all_runs(master, task["id"])
        assert _worker_states(master) == {"online": AGENTS}

    assert Counter(run["status"] for run in runs) == {"succeeded": RUNS}
    workers = {run["attempts"][0]["worker"] for run in runs}
    assert len(workers) > 1, "the runs should be spread over the fleet"
    stats = fleet.stats.summary()
    assert stats["assigns"] == RUNS and stats["acks"] == RUNS, stats
    assert stats["duplicate_assigns"] == 0, stats
    assert (stats["closed_by_server"], stats["dropped"], stats["error_frames"]) == (0, 0, 0), stats
    # One hello per agent: nobody had to reconnect.
    assert stats["welcomes"] == AGENTS, stats
    assert (stats["connect_failures"], stats["crashes"]) == (0, 0), stats
