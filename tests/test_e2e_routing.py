"""End to end: priorities with aging, routing strategies and failover, with a
real `manage.py serve` and real agent processes running real commands.

Order is read off the attempts' assignment times (a capacity-1 agent runs one
thing at a time, so they cannot tie); no assertion is about how long
anything took.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest

from tests.browser import DESKTOP, chromium_page, log_in, task_page
from tests.harness import wait_for

pytestmark = pytest.mark.e2e


def _blocker(flag: Path) -> str:
    """A shell command that runs until the test creates `flag`."""
    return f"while [ ! -e {flag} ]; do sleep 0.05; done"


def _running(master, run_id: int) -> dict:
    def attempt():
        run = master.run_of(run_id)
        live = [a for a in run["attempts"] if a["status"] == "running"]
        return live[0] if live else None

    return wait_for(attempt, what=f"run {run_id} running")


def _started_order(master, run_ids: list[int]) -> list[int]:
    """The runs in the order their (single) attempt was assigned."""
    runs = [master.wait_final(pk) for pk in run_ids]
    assert [r["status"] for r in runs] == ["succeeded"] * len(runs), runs
    return [
        r["id"]
        for r in sorted(
            runs, key=lambda r: dt.datetime.fromisoformat(r["attempts"][0]["assigned_at"])
        )
    ]


def _worker_of(master, run: dict) -> str:
    final = master.wait_final(run["id"])
    assert final["status"] == "succeeded", final
    [attempt] = final["attempts"]
    return attempt["worker"]


# --- priorities ----------------------------------------------------------------------


def test_the_high_priority_run_starts_first_and_equal_ones_in_order(master, start_agent, tmp_path):
    start_agent("agent-1", capacity=1)
    flag = tmp_path / "release"
    blocker = master.create_task(name="blocker", command=_blocker(flag), shell=True)
    low = master.create_task(name="low", command="true")
    high = master.create_task(name="high", command="true", priority=10)
    first = master.trigger(blocker["id"])
    _running(master, first["id"])

    lows = [master.trigger(low["id"])["id"] for _ in range(3)]
    highs = [master.trigger(high["id"])["id"] for _ in range(2)]
    flag.touch()

    assert _started_order(master, lows + highs) == highs + lows


@pytest.mark.master_env(SCHEDULER_PRIORITY_AGING_S="0.2")
def test_a_low_run_that_waited_longer_than_its_gap_beats_a_newer_high_one(
    master, start_agent, tmp_path
):
    # A step of 0.2 s: priority 10 is worth 2 s of waiting.
    start_agent("agent-1", capacity=1)
    flag = tmp_path / "release"
    blocker = master.create_task(name="blocker", command=_blocker(flag), shell=True)
    low = master.create_task(name="low", command="true")
    high = master.create_task(name="high", command="true", priority=10)
    first = master.trigger(blocker["id"])
    _running(master, first["id"])

    aged = master.trigger(low["id"])
    queued = dt.datetime.fromisoformat(aged["attempts"][0]["queued_at"]).timestamp()
    wait_for(lambda: time.time() > queued + 3, what="the low run to wait 3 s (> 10 steps)")
    fresh = master.trigger(low["id"])
    urgent = master.trigger(high["id"])
    flag.touch()

    assert _started_order(master, [fresh["id"], urgent["id"], aged["id"]]) == [
        aged["id"],
        urgent["id"],
        fresh["id"],
    ]


# --- strategies ----------------------------------------------------------------------


def test_round_robin_alternates_across_three_agents(master, start_agent):
    for name in ("agent-1", "agent-2", "agent-3"):
        start_agent(name, capacity=2)
    task = master.create_task(name="turns", command="true", strategy="round_robin")

    # One at a time: every agent is idle each time, so least_loaded would pick
    # the same one every time.
    workers = [_worker_of(master, master.trigger(task["id"])) for _ in range(6)]

    assert workers == ["agent-1", "agent-2", "agent-3"] * 2


def test_random_spreads_runs_over_the_agents(master, start_agent):
    for name in ("agent-1", "agent-2", "agent-3"):
        start_agent(name, capacity=1)
    task = master.create_task(name="dice", command="true", strategy="random")

    workers = [_worker_of(master, master.trigger(task["id"])) for _ in range(30)]

    # Each agent is missed by 30 uniform draws with probability (2/3)^30 < 1e-5.
    assert set(workers) == {"agent-1", "agent-2", "agent-3"}


def test_a_pinned_task_always_lands_on_its_worker(master, start_agent):
    start_agent("agent-1", capacity=4)
    start_agent("agent-2", capacity=2)
    task = master.create_task(
        name="pin", command="true", strategy="pinned", pinned_worker="agent-2"
    )

    # At once (more than agent-2's slots) and one after another.
    together = [master.trigger(task["id"]) for _ in range(5)]
    alone = [master.trigger(task["id"]) for _ in range(1)]

    assert [_worker_of(master, r) for r in together + alone] == ["agent-2"] * 6


def test_broadcast_reaches_every_matching_online_worker_once(master, start_agent):
    start_agent("linux-1", labels="linux")
    start_agent("linux-2", labels="linux,gpu")
    start_agent("mac", labels="mac")
    gone = start_agent("linux-gone", labels="linux")
    gone.stop()
    wait_for(lambda: master.worker_state("linux-gone") == "offline", what="linux-gone offline")
    task = master.create_task(
        name="everywhere",
        command='echo "$SCHEDULER_SHARD_INDEX/$SCHEDULER_SHARD_COUNT"',
        shell=True,
        strategy="broadcast",
        labels=["linux"],
    )

    run_id = master.trigger(task["id"])["id"]
    run = master.wait_final(run_id)

    assert run["status"] == "succeeded", run
    shards = sorted((a["shard_index"], a["worker"]) for a in run["attempts"])
    assert shards == [(0, "linux-1"), (1, "linux-2")]
    # Its result: each worker's stdout, in shard order.
    assert master.api("GET", f"runs/{run_id}").json()["result"] == "0/2\n1/2\n"


def test_broadcast_with_no_matching_online_worker_fails_at_once(master, start_agent):
    start_agent("mac", labels="mac")
    task = master.create_task(
        name="everywhere", command="true", strategy="broadcast", labels=["linux"]
    )

    run = master.trigger(task["id"])

    assert (run["status"], run["reason"], run["attempts"]) == (
        "failed",
        "broadcast: no online worker with the labels linux takes new work",
        [],
    )


# --- failover ------------------------------------------------------------------------


def test_the_retry_of_an_attempt_lost_with_its_agent_runs_on_the_other_agent(
    master, start_agent, tmp_path
):
    first_agent = start_agent("agent-1", capacity=1)
    start_agent("agent-2", capacity=1)
    flag = tmp_path / "killed"
    task = master.create_task(
        name="sturdy",
        # The first try blocks until the kill (then exits, orphaned); the
        # retry, after it, ends at once.
        command=f"[ -e {flag} ] && exit 0; {_blocker(flag)}; exit 1",
        shell=True,
        max_retries=1,
        retry_backoff_s=2,
    )
    run = master.trigger(task["id"])
    attempt = _running(master, run["id"])
    # Both were idle: least_loaded took the first worker, as it would again.
    assert attempt["worker"] == "agent-1"

    first_agent.kill(signal.SIGKILL)
    flag.touch()
    # Back at once under the same name: its hello reports no such attempt, so
    # the attempt is lost now, and agent-1 is idle and first in line for the retry.
    start_agent("agent-1", capacity=1)

    final = master.wait_final(run["id"])
    assert final["status"] == "succeeded", final
    tries = [(a["try_number"], a["status"], a["worker"]) for a in final["attempts"]]
    assert tries == [(1, "lost", "agent-1"), (2, "succeeded", "agent-2")]


# --- dashboard -----------------------------------------------------------------------


def test_the_task_form_pins_a_task_and_its_run_lands_on_that_worker(master, start_agent):
    start_agent("agent-1", capacity=4)
    start_agent("agent-2", capacity=1)
    with chromium_page(DESKTOP, "pinned-form") as page:
        log_in(page, master, then="/tasks/new/")
        page.fill("input[name=name]", "pinned")
        page.fill("textarea[name=command]", "true")
        page.click("#advanced summary")
        page.fill("#id_priority", "7")
        page.select_option("#id_strategy", "pinned")
        page.fill("#id_pinned_worker", "agent-9")
        page.click("button:has-text('Create task')")
        error = page.locator(".field-error[data-field=pinned_worker]")
        assert error.inner_text() == "No worker is named 'agent-9'."

        page.fill("#id_pinned_worker", "agent-2")
        page.click("button:has-text('Create task')")
        page.wait_for_url(task_page(master))
        assert page.inner_text("#task-priority") == "7"
        assert page.inner_text("#task-strategy") == "pinned to agent-2"

        page.click("#run-task")
        page.wait_for_url(f"{master.url}/runs/*/")
        run_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
        run = master.wait_final(run_id)
        assert [a["worker"] for a in run["attempts"]] == ["agent-2"]
