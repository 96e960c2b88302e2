"""Several server processes on a real PostgreSQL and a real Redis (issue 9).

Each test makes its own database and Redis key prefix (tests/engines.py) and
drops them after; under CI an unreachable PostgreSQL or Redis fails the
tests instead of skipping them. The servers are real `manage.py serve`
processes sharing that database and prefix, the agents real agent
processes, and the commands real shell commands.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.engines import ScaleOut, query
from tests.harness import FAST_SETTINGS, ROOT, Master, spawn_agent, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.scale_out]


@pytest.fixture
def install():
    """One install's shared database and Redis prefix."""
    shared = ScaleOut.create()
    yield shared
    shared.drop()


@pytest.fixture
def servers(install, tmp_path):
    """start(n) starts n more servers of the install; all are stopped after."""
    started: list[Master] = []

    def start(count: int = 1, **overrides: str) -> list[Master]:
        for _ in range(count):
            # Lost after 10 s rather than 3: two servers, four agents, their
            # commands, PostgreSQL and Redis share two cores, and a server that
            # falls 3 s behind would look dead to the other.
            env = {**FAST_SETTINGS, "SCHEDULER_LOST_AFTER_S": "10", **install.env, **overrides}
            started.append(Master.launch(tmp_path / f"server-{len(started)}", **env))
        return started

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def agents(tmp_path):
    """start(servers, name, ...) starts an agent given these servers' URLs, in order."""
    started = []

    def start(urls: list[str], enrollment: str, name: str, capacity: int = 4):
        extra: tuple[str, ...] = ()
        for url in urls[1:]:
            extra += ("--server", url)
        agent = spawn_agent(
            urls[0], enrollment, tmp_path, name=name, capacity=capacity, extra=extra
        )
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def _statuses(install: ScaleOut, task_id: int) -> Counter:
    rows = query(
        install.database_url,
        "SELECT status, COUNT(*) FROM tasks_app_run WHERE task_id = %s GROUP BY status",
        (task_id,),
    )
    return Counter(dict(rows))


def _online(install: ScaleOut) -> dict[str, str]:
    """name -> the server process serving each online worker."""
    rows = query(
        install.database_url, "SELECT name, server FROM workers_app_worker WHERE state = 'online'"
    )
    return dict(rows)


def _trigger(server: Master, task_id: int, count: int) -> None:
    left = count
    while left:
        batch = min(left, 250)
        response = server.api("POST", "runs", json={"task": task_id, "count": batch})
        assert response.status_code == 201, response.text
        left -= batch


def _start_fleet(servers, agents, install) -> tuple[Master, Master, list]:
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    fleet = [
        agents([a.url, b.url], enrollment, "node-1"),
        agents([a.url, b.url], enrollment, "node-2"),
        agents([b.url, a.url], enrollment, "node-3"),
        agents([b.url, a.url], enrollment, "node-4"),
    ]
    wait_for(lambda: len(_online(install)) == 4, timeout=30, what="4 agents online")
    # Two on each server (each agent starts with its first URL).
    assert Counter(_online(install).values()) == Counter(
        {_server_name(a): 2, _server_name(b): 2}
    ), _online(install)
    return a, b, fleet


def _server_name(server: Master) -> str:
    [(name,)] = query_servers(server)
    return name


def query_servers(server: Master) -> list[tuple]:
    rows = query(
        server.env["DATABASE_URL"],
        "SELECT name FROM workers_app_server WHERE address = %s",
        (f"127.0.0.1:{server.port}",),
    )
    return rows


def _appending_task(server: Master, ran: Path, name: str, seconds: float = 0) -> dict:
    """A command that writes its run and attempt ids when it starts and when it ends."""
    nap = f"sleep {seconds}; " if seconds else ""
    return server.create_task(
        name=name,
        command=(
            f'echo "start $SCHEDULER_RUN_ID $SCHEDULER_ATTEMPT_ID $(date +%s.%N)" >> {ran}; '
            f'{nap}echo "end $SCHEDULER_RUN_ID $SCHEDULER_ATTEMPT_ID $(date +%s.%N)" >> {ran}'
        ),
        shell=True,
        max_retries=3,
        retry_backoff_s=0.1,
    )


def _spans(ran: Path) -> dict[int, dict[int, list[float]]]:
    """run id -> attempt id -> [start, end] from the commands' own file."""
    spans: dict[int, dict[int, list[float]]] = {}
    for line in ran.read_text().splitlines():
        kind, run_id, attempt_id, at = line.split()
        span = spans.setdefault(int(run_id), {}).setdefault(int(attempt_id), [0.0, 0.0])
        span[0 if kind == "start" else 1] = float(at)
    return spans


def test_two_servers_and_four_agents_run_2000_runs_each_exactly_once(
    install, servers, agents, tmp_path
):
    a, b, _ = _start_fleet(servers, agents, install)
    ran = tmp_path / "ran.txt"
    task = _appending_task(a, ran, "append")

    # Half the triggers through each server.
    _trigger(a, task["id"], 1000)
    _trigger(b, task["id"], 1000)
    wait_for(
        lambda: _statuses(install, task["id"])["succeeded"] == 2000,
        timeout=240,
        interval=0.5,
        what="2000 runs to succeed",
    )

    assert _statuses(install, task["id"]) == {"succeeded": 2000}
    spans = _spans(ran)
    # Each run executed exactly once: one attempt, one start and one end line.
    assert len(spans) == 2000
    assert all(len(attempts) == 1 for attempts in spans.values())
    assert all(start and end for a_ in spans.values() for start, end in a_.values())
    [(attempts, runs)] = query(
        install.database_url,
        "SELECT COUNT(*), COUNT(DISTINCT run_id) FROM tasks_app_attempt WHERE status = 'succeeded'",
    )
    assert (attempts, runs) == (2000, 2000)
    # Both servers dispatched: each agent ran a share.
    per_worker = dict(
        query(
            install.database_url,
            "SELECT worker_name, COUNT(*) FROM tasks_app_attempt GROUP BY worker_name",
        )
    )
    assert sorted(per_worker) == ["node-1", "node-2", "node-3", "node-4"], per_worker


def test_a_server_killed_midway_loses_nothing_and_no_run_overlaps(
    install, servers, agents, tmp_path
):
    a, b, fleet = _start_fleet(servers, agents, install)
    ran = tmp_path / "ran.txt"
    task = _appending_task(a, ran, "append-slowly", seconds=0.05)
    _trigger(a, task["id"], 1000)
    _trigger(b, task["id"], 1000)
    wait_for(
        lambda: _statuses(install, task["id"])["succeeded"] >= 500,
        timeout=120,
        interval=0.2,
        what="a quarter of the runs to succeed",
    )

    a.stop(signal.SIGKILL)
    # Its agents move to the live server.
    wait_for(
        lambda: set(_online(install).values()) == {_server_name(b)} and len(_online(install)) == 4,
        timeout=30,
        what="every agent on server B",
    )
    a.start()  # restarted midway, on the same port
    wait_for(
        lambda: (
            sum(_statuses(install, task["id"]).values())
            == _statuses(install, task["id"])["succeeded"]
            + _statuses(install, task["id"])["failed"]
            and sum(_statuses(install, task["id"]).values()) == 2000
        ),
        timeout=240,
        interval=0.5,
        what="every run to reach a final state",
    )

    statuses = _statuses(install, task["id"])
    assert statuses == {"succeeded": 2000}, statuses
    assert all(agent.proc.poll() is None for agent in fleet)
    # No run on two agents at once: the spans of one run's attempts never overlap.
    for run_id, attempts in _spans(ran).items():
        # A command that never wrote its end (killed) counts as running forever.
        ordered = sorted((start, end or math.inf) for start, end in attempts.values())
        for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
            assert end <= start, f"run {run_id} overlapped: {attempts}"
    # Every run's succeeded attempt is the one whose command ended last.
    assert len(_spans(ran)) == 2000


def _running_on(install: ScaleOut, run_id: int) -> str | None:
    rows = query(
        install.database_url,
        "SELECT worker_name FROM tasks_app_attempt WHERE run_id = %s AND status = 'running'",
        (run_id,),
    )
    return rows[0][0] if rows else None


def test_a_cancel_through_one_server_stops_the_command_on_an_agent_of_the_other(
    install, servers, agents, tmp_path
):
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    agents([b.url], enrollment, "on-b", capacity=1)
    wait_for(lambda: _online(install).get("on-b") == _server_name(b), what="on-b online via B")
    marker = tmp_path / "still-running"
    task = a.create_task(name="long", command=f"sleep 60; touch {marker}", shell=True)

    run = a.trigger(task["id"])
    wait_for(lambda: _running_on(install, run["id"]) == "on-b", what="the run running on on-b")
    started = time.monotonic()
    response = a.api("POST", f"runs/{run['id']}/cancel")
    assert response.status_code == 200, response.text

    final = a.wait_final(run["id"], timeout=20)
    assert final["status"] == "cancelled"
    # The agent killed it (it reported the kill), long before the sleep would end.
    assert time.monotonic() - started < 15
    [(status, reason)] = query(
        install.database_url,
        "SELECT status, reason FROM tasks_app_attempt WHERE run_id = %s",
        (run["id"],),
    )
    assert status == "cancelled", reason
    assert not marker.exists()


def test_a_revoke_and_a_drain_through_one_server_reach_an_agent_of_the_other(
    install, servers, agents
):
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    drained = agents([b.url], enrollment, "drained-on-b", capacity=1)
    revoked = agents([b.url], enrollment, "revoked-on-b", capacity=1)
    wait_for(lambda: len(_online(install)) == 2, what="both agents online via B")
    assert set(_online(install).values()) == {_server_name(b)}
    workers = {w["name"]: w for w in a.api("GET", "workers").json()["results"]}

    response = a.api("POST", f"workers/{workers['drained-on-b']['id']}/drain")
    assert response.status_code == 200, response.text
    wait_for(
        lambda: "draining: new assignments will be rejected" in drained.log(),
        what="the agent on B to hear the drain",
    )
    session = a.logged_in()
    page = session.post(
        f"{a.url}/workers/{workers['revoked-on-b']['id']}/revoke/",
        data={"csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": f"{a.url}/workers/"},
    )
    assert page.status_code == 200, page.text
    # Server B closed its socket with the revoked code; the agent exits with 3.
    assert wait_for(lambda: revoked.proc.poll() is not None, what="the revoked agent to exit")
    assert revoked.proc.returncode == 3, revoked.log()
    assert "credential revoked" in revoked.log()
    assert drained.proc.poll() is None


def test_every_server_shows_the_same_state(install, servers, agents):
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    agents([a.url], enrollment, "node-a", capacity=1)
    agents([b.url], enrollment, "node-b", capacity=1)
    wait_for(lambda: len(_online(install)) == 2, what="both agents online")
    task = a.create_task(name="hello", command="echo hello from $SCHEDULER_RUN_ID", shell=True)
    run = b.trigger(task["id"])
    a.wait_final(run["id"])

    for server in (a, b):
        assert server.run_of(run["id"])["status"] == "succeeded"
        names = sorted(w["name"] for w in server.api("GET", "workers").json()["results"])
        assert names == ["node-a", "node-b"]
        # The dashboard, logged in on the other server (one SECRET_KEY per install).
        session = server.logged_in(password_from=a)
        page = session.get(f"{server.url}/workers/").text
        assert "node-a" in page and "node-b" in page
        assert page.count('class="server-name"') == 2, "both live servers are listed"


# --- the live-servers table --------------------------------------------------------


def _serve(server: Master, port: int, **env: str) -> subprocess.CompletedProcess:
    """Start another `serve` with that server's settings; it must give up at once."""
    return subprocess.run(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**server.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_server_on_the_same_sqlite_file_is_refused(tmp_path):
    first = Master.launch(tmp_path / "only", **FAST_SETTINGS)
    try:
        second = _serve(first, first.port + 1)
        assert second.returncode == 1
        assert re.search(
            r"another server process of this install is alive: server \S+ \(serving"
            rf" 127\.0\.0\.1:{first.port}, last seen \d+s ago\)\. This one cannot start beside"
            r" it: it runs on the SQLite file .*db\.sqlite3, which only one server process may"
            r" use\. Stop the other one, or run every server with DATABASE_URL \(PostgreSQL\)"
            r" and the same REDIS_URL \(Redis\)\.",
            second.stderr,
        ), second.stderr
        # The first one is unharmed.
        assert first.proc.poll() is None
        assert first.api("GET", "workers").status_code == 200
        # Killed, its ghost row does not stop a restart on the same host.
        first.stop(signal.SIGKILL)
        first.start()
        assert first.api("GET", "workers").status_code == 200
    finally:
        first.stop()


def test_postgresql_with_the_in_memory_layer_is_refused_beside_a_live_server(install, servers):
    [first] = servers(1)
    env = {k: v for k, v in first.env.items() if k != "REDIS_URL"}
    second = subprocess.run(
        [sys.executable, "manage.py", "serve", "--port", str(first.port + 1)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert (
        "it uses the in-memory channel layer (REDIS_URL is unset), which cannot reach the agents"
        " connected to another server process" in second.stderr
    ), second.stderr


def test_servers_of_one_install_list_each_other_and_leave_on_stop(install, servers):
    a, b = servers(2)
    rows = query(
        install.database_url,
        "SELECT address, database, channel_layer FROM workers_app_server ORDER BY address",
    )
    layer = f"redis 127.0.0.1:6379/0 prefix {install.prefix}"
    assert sorted(rows) == sorted([(f"127.0.0.1:{s.port}", "postgresql", layer) for s in (a, b)])
    b.stop()  # SIGTERM: a graceful stop leaves the table
    assert query(install.database_url, "SELECT address FROM workers_app_server") == [
        (f"127.0.0.1:{a.port}",)
    ]


# --- the sweeps on every server at once ------------------------------------------------

SWEEP_SETUP = """
import datetime as dt
from django.utils import timezone
from tasks_app.models import Attempt, Run, Task
from workers_app.models import Worker

now = timezone.now()
task = Task.objects.create(name="swept", command="true", max_retries=1, retry_backoff_s=3600)
# Workers that fall silent at the same moment for both servers, each with running work,
# and assignments that time out unaccepted at the same moment too.
silent_at = now - dt.timedelta(seconds=LOST - 1.0)
workers = [
    Worker(name=f"w{i}", capacity=8, state="online", credential_hash=f"{i:064x}",
           last_heartbeat=silent_at)
    for i in range(WORKERS)
]
Worker.objects.bulk_create(workers)
live = Worker.objects.create(name="live", capacity=100000, state="online",
                             credential_hash="f" * 64, last_heartbeat=now + dt.timedelta(days=1))
attempts = []
for worker in list(Worker.objects.exclude(name="live")):
    for _ in range(PER_WORKER):
        run = Run.objects.create(task=task, task_name=task.name, definition=task.definition(),
                                 status="running")
        attempts.append(Attempt(run=run, shard_index=0, try_number=1, status="running",
                                worker=worker, worker_name=worker.name, assigned_at=now,
                                accepted_at=now, started_at=now, ready_at=now, queue_at=now))
unaccepted_at = now - dt.timedelta(seconds=ACCEPT - 1.0)
for _ in range(UNACCEPTED):
    run = Run.objects.create(task=task, task_name=task.name, definition=task.definition(),
                             status="queued")
    attempts.append(Attempt(run=run, shard_index=0, try_number=1, status="assigned",
                            worker=live, worker_name="live", assigned_at=unaccepted_at,
                            ready_at=now, queue_at=now))
Attempt.objects.bulk_create(attempts)
print("ok")
"""


def test_the_sweeps_on_both_servers_at_once_lose_and_retry_each_attempt_once(install, servers):
    # Dispatch is paused so the handed-back assignments stay queued where we can count them.
    a, b = servers(2, SCHEDULER_LOST_AFTER_S="3", SCHEDULER_ACCEPT_TIMEOUT_S="3")
    assert a.api("POST", "scheduler/pause").status_code == 200
    workers, per_worker, unaccepted = 60, 5, 200
    script = (
        SWEEP_SETUP.replace("WORKERS", str(workers))
        .replace("PER_WORKER", str(per_worker))
        .replace("UNACCEPTED", str(unaccepted))
        .replace("LOST", "3")
        .replace("ACCEPT", "3")
    )
    assert a.manage("shell", "-v", "0", "-c", script) == "ok"

    lost_total = workers * per_worker
    wait_for(
        lambda: (
            query(
                install.database_url,
                "SELECT COUNT(*) FROM tasks_app_attempt WHERE try_number = 2",
            )[0][0]
            == lost_total
            and query(
                install.database_url,
                "SELECT COUNT(*) FROM tasks_app_attempt WHERE status = 'assigned'",
            )[0][0]
            == 0
        ),
        timeout=60,
        what="every silent worker's attempts lost and retried, every stale assignment back",
    )
    time.sleep(3 * 0.2 * 3)  # a few more ticks of both servers: nothing more may move

    rows = query(
        install.database_url,
        "SELECT try_number, status, COUNT(*) FROM tasks_app_attempt GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert rows == [
        (1, "lost", lost_total),
        (1, "queued", unaccepted),
        (2, "queued", lost_total),
    ]
    # Each server logs what its own statements moved: together, every attempt once.
    logs = a.log_path.read_text() + b.log_path.read_text()
    declared = [
        int(pk)
        for line in re.findall(r"declared lost: attempts \[([\d, ]+)\]", logs)
        for pk in line.split(", ")
    ]
    handed = [
        int(pk)
        for line in re.findall(r"handed back unaccepted: attempts \[([\d, ]+)\]", logs)
        for pk in line.split(", ")
    ]
    assert len(declared) == len(set(declared)) == lost_total
    assert len(handed) == len(set(handed)) == unaccepted


def test_a_rolling_restart_of_both_servers_kills_no_running_command(
    install, servers, agents, tmp_path
):
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    agents([a.url, b.url], enrollment, "node-1", capacity=2)
    agents([b.url, a.url], enrollment, "node-2", capacity=2)
    wait_for(lambda: len(_online(install)) == 2, what="both agents online")
    task = a.create_task(
        name="through-upgrades",
        command='sleep 12; echo "survived $SCHEDULER_RUN_ID"',
        shell=True,
    )
    runs = [a.trigger(task["id"]) for _ in range(4)]
    wait_for(lambda: all(_running_on(install, run["id"]) for run in runs), what="all four running")

    # One server at a time, as an upgrade does: stop, start the new code, next.
    for server in (a, b):
        server.stop()
        wait_for(
            lambda s=server: _server_name_or_none(s) is None, what="the stopped server to leave"
        )
        server.start()
        wait_for(lambda: len(_online(install)) == 2, timeout=30, what="both agents back online")

    for run in runs:
        final = a.wait_final(run["id"], timeout=60)
        assert final["status"] == "succeeded", final
        assert len(final["attempts"]) == 1, final["attempts"]
        result = a.api("GET", f"runs/{run['id']}/result")
        assert result.text == f"survived {run['id']}\n"


def _server_name_or_none(server: Master) -> str | None:
    rows = query_servers(server)
    return rows[0][0] if rows else None


def test_work_queued_through_one_server_starts_at_once_on_an_agent_of_another(
    install, servers, agents
):
    # Ticks 30 s apart: only the servers' messages to each other can make this fast.
    # Server A's board never saw the agent (it connected to B after A's last
    # tick), so B must hear of the work from A.
    a, b = servers(2, SCHEDULER_TICK_S="30", SCHEDULER_LOST_AFTER_S="120")
    enrollment = a.manage("enrollment-token", "--auto-approve")
    agents([b.url], enrollment, "only-on-b", capacity=1)
    wait_for(lambda: _online(install).get("only-on-b") == _server_name(b), what="online via B")
    task = a.create_task(name="quick", command="true")

    began = time.monotonic()
    run = a.trigger(task["id"])
    final = a.wait_final(run["id"], timeout=25)

    assert final["status"] == "succeeded"
    assert time.monotonic() - began < 10, "waited for a tick instead of being told"
    [(started_after_ms,)] = query(
        install.database_url,
        "SELECT EXTRACT(EPOCH FROM (a.started_at - r.created_at)) * 1000"
        " FROM tasks_app_attempt a JOIN tasks_app_run r ON r.id = a.run_id WHERE r.id = %s",
        (run["id"],),
    )
    assert started_after_ms < 5000, started_after_ms


SWEEP_AT_ONCE = """
import json, time
from tasks_app import lifecycle
from workers_app import liveness

moved = []
lose = lifecycle.lose
def recording(ids, reason):
    done = lose(ids, reason)
    moved.extend(done)
    return done
lifecycle.lose = recording
time.sleep(max(0.0, START - time.time()))
liveness.reap_lost()
handed = lifecycle.requeue_unaccepted()
print(json.dumps({"lost": moved, "handed": handed}))
"""


def test_two_processes_sweeping_at_the_same_instant_move_each_attempt_once(
    install, servers, tmp_path
):
    # The servers' own ticks may or may not overlap; here two processes run the
    # same sweeps over the same rows from the same instant, each on its own
    # connection, and the database must let each row move once.
    [server] = servers(1, SCHEDULER_LOST_AFTER_S="3", SCHEDULER_ACCEPT_TIMEOUT_S="3")
    assert server.api("POST", "scheduler/pause").status_code == 200
    server.stop()  # its own ticks are not part of this
    workers, per_worker, unaccepted = 40, 5, 200
    setup = (
        SWEEP_SETUP.replace("WORKERS", str(workers))
        .replace("PER_WORKER", str(per_worker))
        .replace("UNACCEPTED", str(unaccepted))
        .replace("LOST", "13")  # silent 12 s already: due at once for both
        .replace("ACCEPT", "13")
    )
    assert server.manage("shell", "-v", "0", "-c", setup) == "ok"
    script = SWEEP_AT_ONCE.replace("START", repr(time.time() + 4.0))
    sweepers = [
        subprocess.Popen(
            [sys.executable, "manage.py", "shell", "-v", "0", "-c", script],
            cwd=ROOT,
            env={**server.env, "SCHEDULER_DATA_DIR": str(tmp_path / f"sweeper-{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for sweeper in sweepers:
        out, err = sweeper.communicate(timeout=120)
        assert sweeper.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    lost = [pk for r in results for pk in r["lost"]]
    handed = [pk for r in results for pk in r["handed"]]
    assert len(lost) == len(set(lost)) == workers * per_worker
    assert len(handed) == len(set(handed)) == unaccepted
    rows = query(
        install.database_url,
        "SELECT try_number, status, COUNT(*) FROM tasks_app_attempt GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert rows == [
        (1, "lost", workers * per_worker),
        (1, "queued", unaccepted),
        (2, "queued", workers * per_worker),
    ]


LIVE_LINES = "for i in 1 2 3; do echo line $i; sleep 0.3; done"


def test_a_live_page_on_one_server_follows_a_run_and_its_output_on_the_other(
    install, servers, agents
):
    """The dashboard's live socket on server B hears of a run triggered through A
    and of the lines its agent (connected to A) prints: through Redis."""
    a, b = servers(2)
    enrollment = a.manage("enrollment-token", "--auto-approve")
    agents([a.url], enrollment, "on-a", capacity=1)
    wait_for(lambda: _online(install).get("on-a") == _server_name(a), what="on-a online via A")
    task = a.create_task(name="lines", command=LIVE_LINES, shell=True)
    session = b.logged_in(password_from=a)
    cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())

    async def watch_on_b() -> tuple[list[dict], list[dict]]:
        headers = {"Cookie": cookie, "Origin": b.url}
        async with connect(
            b.url.replace("http", "ws") + "/ws/live/", additional_headers=headers
        ) as ws:
            runs = {"id": "run-table", "src": "/runs/", "on": "runs attempts"}
            await ws.send(json.dumps({"type": "watch", "regions": [runs], "since": None}))
            await asyncio.sleep(0.3)
            run_id = (await asyncio.to_thread(a.trigger, task["id"]))["id"]
            htmls = [json.loads(await asyncio.wait_for(ws.recv(), 10))]
            assert f'href="/runs/{run_id}/"' in htmls[0]["html"]
            # Now as the run's page, from its first line on.
            region = {"id": "run-live", "src": f"/runs/{run_id}/", "on": f"run:{run_id}"}
            attempt = await asyncio.to_thread(
                lambda: wait_for(lambda: a.run_of(run_id)["attempts"], what="an attempt")[0]["id"]
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "watch",
                        "regions": [region],
                        "run": run_id,
                        "output": {str(attempt): 0},
                        "since": None,
                    }
                )
            )
            lines: list[dict] = []
            while "".join(f["html"] for f in lines).count('class="line"') < 3:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                (lines if frame["type"] == "output" else htmls).append(frame)
            return htmls, lines

    htmls, lines = asyncio.run(watch_on_b())
    # As the output viewer's markup: numbered lines, in order.
    assert "".join(f["html"] for f in lines) == "".join(
        f'<span class="line" data-stream="stdout" data-n="{n}">line {n}</span>' for n in (1, 2, 3)
    )
    assert [f["seq"] for f in lines] == sorted(f["seq"] for f in lines)
