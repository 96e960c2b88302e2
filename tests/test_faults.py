"""Faults injected into real processes: SIGKILL, restarts, cut connections.

Intervals are shortened through the settings (conftest.FAST_SETTINGS and the
master_env marker); every wait is a condition with a deadline.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import alive, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

PY = sys.executable


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def attempts_in(master, run_id: int, status: str) -> list[dict]:
    return [a for a in master.run_of(run_id)["attempts"] if a["status"] == status]


def test_a_killed_agents_attempts_are_lost_in_time_and_complete_on_another_agent(
    master, start_agent
):
    doomed = start_agent("doomed", capacity=5)
    task = master.create_task(
        name="five",
        command=f'{PY} -c "import time; time.sleep(2)"',
        max_retries=1,
        retry_backoff_s=0.1,
    )
    runs = [master.trigger(task["id"])["id"] for _ in range(5)]
    wait_for(
        lambda: all(attempts_in(master, r, "running") for r in runs), what="5 attempts running"
    )
    start_agent("survivor", capacity=5)

    doomed.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: all(attempts_in(master, r, "lost") for r in runs), timeout=3 + 5 + 5)
    lost_after = time.monotonic() - killed_at
    finished = [master.wait_final(r) for r in runs]

    print(f"\n5 attempts declared lost {lost_after:.2f}s after SIGKILL (lost-after 3s)")
    assert lost_after <= 3 + 5
    for run in finished:
        first, second = run["attempts"]
        assert (first["worker"], first["status"]) == ("doomed", "lost")
        assert first["reason"] == "worker lost: no heartbeat for 3s"
        assert (second["worker"], second["status"], second["try_number"]) == (
            "survivor",
            "succeeded",
            2,
        )
        assert run["status"] == "succeeded"
    assert master.api("GET", "runs?status=running").json()["results"] == []


@pytest.mark.master_env(SCHEDULER_LOST_AFTER_S="15")
def test_a_server_killed_mid_run_stores_the_result_once_after_restart(master, start_agent):
    start_agent("steady")
    task = master.create_task(
        name="spanning",
        command=f"{PY} -c \"import time; print('begin', flush=True); time.sleep(3); print('end')\"",
    )
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, run_id, "running"), what="running")
    wait_for(lambda: "begin" in master.run_of(run_id)["attempts"][0]["output"], what="begin")

    master.stop(signal.SIGKILL)
    master.start()
    run = master.wait_final(run_id)

    assert run["status"] == "succeeded"
    (attempt,) = run["attempts"]
    assert (attempt["status"], attempt["exit_code"], attempt["try_number"]) == ("succeeded", 0, 1)
    assert attempt["output"] == "begin\nend\n"
    assert attempt["superseded"] is False


@pytest.mark.master_env(SCHEDULER_LOST_AFTER_S="15")
def test_a_dropped_socket_loses_no_log_line_and_causes_no_retry(master, start_agent, proxy):
    start_agent("flaky", server=proxy.url)
    script = "import time\nfor i in range(80):\n    print(i, flush=True)\n    time.sleep(0.05)"
    task = master.create_task(name="counter", command=f"{PY} -c '{script}'", max_retries=3)
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: "5\n" in master.run_of(run_id)["attempts"][0]["output"], what="output")

    proxy.cut()
    wait_for(lambda: master.worker_state("flaky") == "offline", what="socket closed on master")
    time.sleep(2)  # the outage itself: a few seconds without a connection
    proxy.heal()
    run = master.wait_final(run_id)

    assert run["status"] == "succeeded"
    (attempt,) = run["attempts"]
    assert attempt["try_number"] == 1
    assert attempt["output"] == "".join(f"{i}\n" for i in range(80))


def test_a_timeout_kills_the_whole_process_group(master, start_agent, tmp_path):
    start_agent("timer")
    pid_file = tmp_path / "background.pid"
    task = master.create_task(
        name="runaway",
        command=f"sleep 1000 & echo $! > {pid_file}; sleep 1000",
        shell=True,
        timeout=1,
    )

    run = master.wait_final(master.trigger(task["id"])["id"])

    (attempt,) = run["attempts"]
    assert attempt["status"] == "timed_out"
    assert attempt["reason"] == "timed out after 1s"
    background = int(pid_file.read_text())
    wait_for(lambda: not alive(background), timeout=10, what="the background sleep to die")


def test_cancelling_a_running_command_kills_it(master, start_agent, tmp_path):
    start_agent("canceller")
    pid_file = tmp_path / "sleep.pid"
    task = master.create_task(
        name="long", command=f"echo $$ > {pid_file}; exec sleep 60", shell=True
    )
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, run_id, "running") and pid_file.exists(), what="running")
    pid = int(pid_file.read_text())

    asked = time.monotonic()
    response = master.api("POST", f"runs/{run_id}/cancel")
    assert response.status_code == 200, response.text
    run = master.wait_final(run_id, timeout=10)
    took = time.monotonic() - asked

    print(f"\nrunning sleep 60 cancelled in {took:.2f}s")
    assert run["status"] == "cancelled"
    assert run["attempts"][0]["status"] == "cancelled"
    wait_for(lambda: not alive(pid), timeout=5, what="the sleep to die")
    again = master.api("POST", f"runs/{run_id}/cancel")
    assert again.status_code == 409


def test_a_queued_run_is_cancelled_at_once(master):
    task = master.create_task(name="nobody-runs-me", command="true")
    run_id = master.trigger(task["id"])["id"]

    response = master.api("POST", f"runs/{run_id}/cancel")

    assert response.json()["status"] == "cancelled"
    assert response.json()["attempts"][0]["status"] == "cancelled"


def test_a_command_that_kills_its_agent_stops_after_max_retries_plus_one(master, start_agent):
    agent = start_agent("victim")
    task = master.create_task(
        name="agent-killer",
        command="kill -9 $PPID; sleep 5",
        shell=True,
        max_retries=2,
        retry_backoff_s=0.1,
    )
    run_id = master.trigger(task["id"])["id"]
    stop = threading.Event()

    def supervise():
        # What systemd would do: restart the agent whenever it dies.
        current = agent
        while not stop.is_set():
            if current.proc.poll() is not None:
                current = start_agent("victim", wait_online=False)
            time.sleep(0.1)

    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    try:
        run = master.wait_final(run_id, timeout=60)
    finally:
        stop.set()
        supervisor.join()

    assert run["status"] == "failed"
    assert [a["status"] for a in run["attempts"]] == ["lost", "lost", "lost"]
    assert [a["try_number"] for a in run["attempts"]] == [1, 2, 3]
    assert run["reason"].endswith("(after 3 attempts)")


def test_fifty_megabytes_of_output_are_capped_and_the_server_stays_small(master, start_agent):
    start_agent("chatty")
    task = master.create_task(
        name="firehose",
        # 50 MiB in 1 KiB lines, as fast as Python can print them.
        command=f"{PY} -c \"import sys; [print('x' * 1023) for _ in range(51200)]\"",
    )
    before = rss_kib(master.proc.pid)

    run = master.wait_final(master.trigger(task["id"])["id"], timeout=120)

    after = rss_kib(master.proc.pid)
    (attempt,) = run["attempts"]
    print(
        f"\nserver RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after 50 MB of output"
    )
    assert (attempt["status"], attempt["exit_code"]) == ("succeeded", 0)
    assert attempt["truncated"] is True
    assert attempt["output_bytes"] == 50 * 1024 * 1024
    limit = 4 * 1024 * 1024
    assert attempt["output"].endswith(
        f"\n[output truncated: kept {limit} of {50 * 1024 * 1024} bytes]\n"
    )
    assert len(attempt["stdout"].encode()) <= limit + 200
    assert after - before < 64 * 1024, "server RSS grew by more than 64 MiB"


@pytest.mark.master_env(SCHEDULER_SELF_FENCE="false")
def test_a_late_result_after_lost_is_recorded_as_superseded(master, start_agent, proxy):
    start_agent("partitioned", server=proxy.url)
    # The first attempt outlives the partition; its retry is quick.
    script = "import os, time; time.sleep(60 if os.environ['SCHEDULER_ATTEMPT_ID'] == '1' else 0.5)"
    task = master.create_task(
        name="overtaken",
        command=f'{PY} -c "{script}"',
        max_retries=1,
        retry_backoff_s=0.1,
    )
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, run_id, "running"), what="running")

    proxy.cut()
    wait_for(lambda: attempts_in(master, run_id, "lost"), timeout=15, what="declared lost")
    start_agent("rescuer")
    wait_for(lambda: attempts_in(master, run_id, "running"), what="the retry running")
    proxy.heal()
    # The agent reconnects with backoff (up to 15 s), then is told to stop the zombie.
    wait_for(
        lambda: master.run_of(run_id)["attempts"][0]["superseded"], timeout=40, what="late report"
    )
    run = master.wait_final(run_id)

    first, second = run["attempts"]
    assert first["status"] == "lost"
    # On reconnect the master stopped the zombie, so it reported "cancelled", late.
    assert first["late_result"]["status"] == "cancelled"
    assert (second["worker"], second["status"]) == ("rescuer", "succeeded")
    assert run["status"] == "succeeded"


def test_soak_300_runs_with_agents_killed_at_random_never_overlap(master, start_agent, tmp_path):
    ledger = tmp_path / "ledger.txt"
    agents = {name: start_agent(name, capacity=4) for name in ("soak-a", "soak-b")}
    record = (
        f'echo "$SCHEDULER_RUN_ID $SCHEDULER_ATTEMPT_ID start $(date +%s.%N)" >> {ledger}; '
        f"sleep 0.1; "
        f'echo "$SCHEDULER_RUN_ID $SCHEDULER_ATTEMPT_ID end $(date +%s.%N)" >> {ledger}'
    )
    task = master.create_task(
        name="soak",
        command=record,
        shell=True,
        max_retries=10,
        retry_backoff_s=0.2,
        retry_backoff_max_s=1,
    )
    runs = [master.trigger(task["id"])["id"] for _ in range(300)]
    rng = random.Random(7)
    for _ in range(3):
        wait_for(lambda: ledger.exists() and ledger.stat().st_size > 0, what="progress")
        time.sleep(rng.uniform(0.5, 1.5))
        name = rng.choice(sorted(agents))
        agents[name].kill(signal.SIGKILL)
        agents[name] = start_agent(name, capacity=4)

    finished = [master.wait_final(r, timeout=120) for r in runs]

    assert {run["status"] for run in finished} == {"succeeded"}
    spans: dict[str, dict[str, list[float]]] = {}
    for line in ledger.read_text().splitlines():
        run_id, attempt_id, edge, stamp = line.split()
        spans.setdefault(run_id, {}).setdefault(attempt_id, []).append(float(stamp))
    assert set(spans) == {str(r) for r in runs}
    for run_id, attempts in spans.items():
        intervals = sorted((min(s), max(s)) for s in attempts.values())
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            assert end <= start, f"run {run_id}: two attempts overlapped"


def test_a_command_dies_with_its_killed_agent_instead_of_running_on_as_an_orphan(
    master, start_agent, tmp_path
):
    agent = start_agent("mortal")
    pid_file = tmp_path / "orphan.pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    task = master.create_task(name="would-be-orphan", command=f'{PY} -c "{script}"')
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, run_id, "running") and pid_file.exists(), what="running")
    pid = int(pid_file.read_text())

    agent.kill(signal.SIGKILL)

    # The retry elsewhere must not overlap it: it goes with its agent.
    wait_for(lambda: not alive(pid), timeout=5, what="the command to die with its agent")


def test_sigterm_drains_an_agent_its_command_finishes_and_new_work_goes_elsewhere(
    master, start_agent
):
    leaving = start_agent("leaving")
    task = master.create_task(name="finish-me", command=f'{PY} -c "import time; time.sleep(2)"')
    first = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, first, "running"), what="running")

    leaving.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: master.worker_state("leaving") == "draining", what="draining")
    second = master.trigger(task["id"])["id"]
    done = master.wait_final(first)

    assert done["status"] == "succeeded"
    assert leaving.proc.wait(timeout=20) == 0
    assert master.run_of(second)["status"] == "queued"
    start_agent("staying")
    assert master.wait_final(second)["attempts"][0]["worker"] == "staying"


def test_an_agent_cut_off_from_the_master_fences_itself(master, start_agent, proxy, tmp_path):
    agent = start_agent("cut-off", server=proxy.url)
    pid_file = tmp_path / "fenced.pid"
    task = master.create_task(
        name="fence-me", command=f"echo $$ > {pid_file}; exec sleep 60", shell=True
    )
    run_id = master.trigger(task["id"])["id"]
    wait_for(lambda: attempts_in(master, run_id, "running") and pid_file.exists(), what="running")
    pid = int(pid_file.read_text())

    proxy.cut()
    cut_at = time.monotonic()
    # fence_after_s = max(3 - 2 * 0.5, 3 / 2) = 2 s with the test settings.
    wait_for(lambda: not alive(pid), timeout=10, what="the agent to kill its command")
    fenced_after = time.monotonic() - cut_at
    proxy.heal()
    run = master.wait_final(run_id, timeout=40)

    print(f"\ncommand killed {fenced_after:.2f}s after the cut (fence after 2s, lost after 3s)")
    assert "self-fenced: no contact with the master for 2s" in agent.log()
    (attempt,) = run["attempts"]
    assert attempt["status"] == "lost"
    assert run["status"] == "failed"
