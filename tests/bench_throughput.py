"""Throughput and start latency of runs of `true` through a real server and agents.

Not a test (nothing asserts on time, machines are noisy): run it by hand,
    .venv/bin/python tests/bench_throughput.py [RUNS] [AGENTS] [CAPACITY]
and it prints figures. It starts `manage.py serve` on a free port with its
own data dir and real agents, like the end-to-end tests.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import AGENT, Master, free_port  # noqa: E402


def main() -> None:
    given = [int(a) for a in sys.argv[1:4]]
    runs, agents, capacity = given + [500, 2, 8][len(given) :]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **os.environ,
            "SCHEDULER_DATA_DIR": f"{tmp}/master",
            "SCHEDULER_LOG_LEVEL": "WARNING",
        }
        master = Master(
            url=f"http://127.0.0.1:{port}", port=port, data_dir=Path(f"{tmp}/master"), env=env
        )
        master.manage("migrate", "-v0")
        master.manage("ensureadmin")
        master.token = master.manage("apitoken", "admin")
        master.start()
        token = master.manage("enrollment-token")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(AGENT),
                    "--server",
                    master.url,
                    "--token",
                    token,
                    "--name",
                    f"bench-{i}",
                    "--capacity",
                    str(capacity),
                    "--state-dir",
                    f"{tmp}/agent-{i}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(agents)
        ]
        try:
            while (
                sum(w["state"] == "online" for w in master.api("GET", "workers").json()["results"])
                < agents
            ):
                time.sleep(0.1)
            task = master.create_task(name="noop", command="true")
            session = requests.Session()
            headers = {"Authorization": f"Bearer {master.token}"}
            started = time.monotonic()
            for _ in range(runs):
                session.post(
                    f"{master.url}/api/tasks/{task['id']}/run", headers=headers, timeout=30
                )
            triggered = time.monotonic() - started
            while True:
                state = master.api("GET", "scheduler").json()
                if state["runs_queued"] == 0 and state["runs_running"] == 0:
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            latencies = []
            statuses = set()
            url = "runs?limit=200"
            while url:
                body = master.api("GET", url).json()
                for run in body["results"]:
                    statuses.add(run["status"])
                    attempt = run["attempts"][0]
                    delta = dt.datetime.fromisoformat(
                        attempt["started_at"]
                    ) - dt.datetime.fromisoformat(run["created_at"])
                    latencies.append(delta.total_seconds() * 1000)
                url = body["next"] and body["next"].removeprefix("/api/")
            latencies.sort()
            assert statuses == {"succeeded"}, statuses
            print(
                f"{runs} runs of `true`, {agents} agents x {capacity} slots, "
                "SQLite + in-memory layer"
            )
            print(
                f"  triggering over HTTP took {triggered:.2f}s ({runs / triggered:.0f} requests/s)"
            )
            print(f"  all succeeded after {elapsed:.2f}s: {runs / elapsed:.0f} runs/s end to end")
            print(
                f"  created -> process started: p50 {statistics.median(latencies):.1f} ms, "
                f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.1f} ms "
                "(includes queueing behind busy slots)"
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
            master.stop()


if __name__ == "__main__":
    main()
