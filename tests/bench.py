"""The benchmark of issue 6: `make bench`, or `.venv/bin/python tests/bench.py [flags]`.

It starts real servers (`manage.py serve` on the embedded default: SQLite and
the in-memory channel layer) with real agents or the simulated fleet, like
the end-to-end tests, and prints one JSON object on stdout (progress on
stderr). Nothing is asserted on time: machines are noisy, and only ratios
taken beside ../shared/peers/celery_bench.py in one sitting count.

Sections (--only picks some; flags scale every count down):
- throughput_api: --runs runs of `true` triggered by --clients API clients
  (threads, keep-alive connections), --agents real agents of --capacity
  slots: runs/s from the first run's created_at to the last attempt's
  finished_at, triggers/s, whole-machine CPU ms per run (/proc/stat) and the
  server's, agents' and commands' share; created_to_started_ms there
  includes the wait for a free slot;
- throughput_bulk: the same runs through POST /api/runs, 1,000 per request;
- latency: --latency-runs runs one after another on an idle agent:
  created->started and created->finished percentiles;
- fleet: --fleet simulated agents (tests/fleet.py) on one server process: its
  RSS and CPU while idle, workers declared lost or closed by the server,
  created->started for runs triggered one by one at 100/s across them
  (runs_steady), and for one run per agent triggered in one bulk request (runs);
- history: the runs API and page with --history seeded runs (manage.py
  seedruns): first page and a deep one, by task, status and both;
- output: a command printing --output-mb MB: peak RSS growth of server and agent.

The definitions of pct(), cpu_sample(), cpu_window() and machine_info() are
those of celery_bench.py, copied, so that the ratios are fair. Waiting for
runs to finish reads the server's SQLite file read-only rather than polling
the API, whose every request costs the server ~2 ms of CPU on the 2-core
machine and would disturb what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fleet import Fleet  # noqa: E402
from tests.harness import ROOT, Agent, Master, proc_stat, spawn_agent, wait_for  # noqa: E402

SECTIONS = ("throughput_api", "throughput_bulk", "latency", "fleet", "history", "output")
FINAL = ("succeeded", "failed", "cancelled")
BULK_MAX = 1000  # runs per POST /api/runs (the API's cap)
HISTORY_TASKS = 20
WAIT_NOTE = "reads of the server's database beside it (its SQLite file read-only), every {} ms"


def log(*parts) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# --- the definitions of ../shared/peers/celery_bench.py -------------------------------


def pct(values, p):
    """Percentile with linear interpolation between closest ranks (numpy 'linear')."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(values_s):
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(pct(ms, 50), 3),
        "p95": round(pct(ms, 95), 3),
        "p99": round(pct(ms, 99), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


def cpu_sample():
    """System-wide CPU jiffies from /proc/stat: (total, idle+iowait, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4], v[7]


def cpu_window(a, b, n):
    """CPU use of the whole machine between two samples, and per unit of work."""
    hz = os.sysconf("SC_CLK_TCK")
    total = b[0] - a[0]
    busy = total - (b[1] - a[1])
    if total <= 0:
        return {}
    return {
        "cpu_busy_pct_all_cores": round(100.0 * busy / total, 1),
        "cpu_busy_core_s": round(busy / hz, 2),
        "cpu_ms_per_run": round(1000.0 * busy / hz / n, 3),
        "steal_pct": round(100.0 * (b[2] - a[2]) / total, 2),
    }


def machine_info():
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


# --- processes, from /proc ---------------------------------------------------------------


def proc_cpu_s(pid: int, children: bool = False) -> float:
    """utime + stime of a process (with children: of its waited-for children instead)."""
    fields = proc_stat(pid)
    # State is field 3 of proc(5), so utime (14) is index 11.
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def proc_kb(pid: int, name: str) -> int:
    """A /proc/<pid>/status figure in kB: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


def git_revision() -> str:
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


# --- reading the server's database, read-only -----------------------------------------


def epoch(value: str | dt.datetime | None) -> float | None:
    """A DateTimeField as SQLite keeps it (naive UTC text) or psycopg reads it -> epoch seconds."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()


@dataclass
class RunRow:
    id: int
    status: str
    created: float
    assigned: float | None
    started: float | None
    finished: float | None


class Db:
    """The server's database, read beside it: the SQLite file opened read-only
    (reading it costs the server nothing), or its PostgreSQL database."""

    def __init__(self, data_dir: Path, database_url: str = "") -> None:
        self.postgres = bool(database_url)
        if self.postgres:
            import psycopg

            from tests.engines import libpq

            self.conn = psycopg.connect(libpq(database_url), autocommit=True)
        else:
            uri = f"file:{data_dir / 'db.sqlite3'}?mode=ro"
            # Autocommit: no read transaction stays open between polls.
            self.conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False
            )
        self.lock = threading.Lock()  # a psycopg connection serves one thread at a time

    @classmethod
    def of(cls, master: Master) -> Db:
        return cls(master.data_dir, master.env.get("DATABASE_URL", ""))

    def all(self, sql: str, *params) -> list[tuple]:
        if self.postgres:
            sql = sql.replace("?", "%s")
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, *params):
        rows = self.all(sql, *params)
        return rows[0] if rows else None

    def active(self, task_id: int) -> int:
        sql = "SELECT count(*) FROM tasks_app_run WHERE status IN ('queued', 'running')"
        return self.one(f"{sql} AND task_id = ?", task_id)[0]

    def status(self, run_id: int) -> str:
        return self.one("SELECT status FROM tasks_app_run WHERE id = ?", run_id)[0]

    def runs(self, task_id: int) -> list[RunRow]:
        """Every run of a task with the times of its latest attempt."""
        rows = self.all(
            "SELECT r.id, r.status, r.created_at, a.assigned_at, a.started_at, a.finished_at"
            " FROM tasks_app_run r LEFT JOIN tasks_app_attempt a ON a.run_id = r.id"
            " WHERE r.task_id = ? ORDER BY r.id, a.try_number",
            task_id,
        )
        latest = {row[0]: row for row in rows}
        return [
            RunRow(row[0], row[1], *(epoch(value) for value in row[2:])) for row in latest.values()
        ]

    def wait_all_final(self, server: Master, task_id: int, timeout: float, every=0.01) -> None:
        """Until no run of the task is queued or running; fails early if the server died."""
        deadline = time.monotonic() + timeout
        while self.active(task_id):
            if server.proc.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited ({server.proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.active(task_id)} runs still active after {timeout}s")
            time.sleep(every)

    def close(self) -> None:
        self.conn.close()


# --- HTTP --------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection: the cheapest honest client."""

    def __init__(self, master: Master, headers: dict | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", master.port, timeout=60)
        self.headers = headers or {"Authorization": f"Bearer {master.token}"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else b""
        headers = {**self.headers, "Content-Length": str(len(data))}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def json(self, method: str, path: str, body: dict | None = None, expect: int = 200):
        status, data = self.call(method, path, body)
        if status != expect:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def dashboard_cookie(master: Master) -> str:
    """Log in as admin through /login/ (with its CSRF token); the Cookie header to send."""
    session = requests.Session()
    page = session.get(f"{master.url}/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    password = (master.data_dir / "admin-password.txt").read_text().strip()
    form = {"username": "admin", "password": password, "csrfmiddlewaretoken": token}
    response = session.post(f"{master.url}/login/", data=form, timeout=10, allow_redirects=False)
    if response.status_code != 302 or "sessionid" not in session.cookies:
        raise RuntimeError(f"login failed: {response.status_code}")
    return "; ".join(f"{name}={value}" for name, value in session.cookies.items())


# --- servers and agents ---------------------------------------------------------------


def launch(work: Path, name: str) -> Master:
    log(f"starting a server ({name})")
    return Master.launch(work / name)


@contextlib.contextmanager
def served(work: Path, name: str) -> Iterator[Master]:
    """A server of its own for one section, stopped whatever happens."""
    master = launch(work, name)
    try:
        yield master
    finally:
        master.release()


def start_agents(servers: list[Master], count: int, capacity: int) -> list[Agent]:
    """Real agents, their state dirs and logs beside the first server's data; agent
    i starts on server i (mod their number) and is given the others' URLs too."""
    master = servers[0]
    enrollment = master.manage("enrollment-token", "--auto-approve")
    agents = []
    for i in range(count):
        own = servers[i % len(servers)]
        others = [s for s in servers if s is not own]
        extra = tuple(arg for s in others for arg in ("--server", s.url))
        agents.append(
            spawn_agent(
                own.url,
                enrollment,
                master.data_dir,
                name=f"bench-{i}",
                capacity=capacity,
                extra=extra,
            )
        )
    for agent in agents:
        try:
            wait_for(
                lambda a=agent: master.worker_state(a.name) == "online",
                timeout=30,
                what=f"agent {agent.name} online",
            )
        except AssertionError as exc:
            tails = _tails(master, agent)
            for spawned in agents:  # an agent left behind would retry its server forever
                spawned.stop()
            raise RuntimeError(f"{exc}\n{tails}") from None
    return agents


def _tails(master: Master, agent: Agent, lines: int = 20) -> str:
    """The end of the server's and the agent's logs, for a report of what went wrong."""
    server = master.log_path.read_text(errors="replace").splitlines()[-lines:]
    own = agent.log().splitlines()[-lines:]
    return "server log:\n" + "\n".join(server) + "\nagent log:\n" + "\n".join(own)


@dataclass
class System:
    """Servers (one, or several of one install) with real agents, shared by the
    throughput and latency sections."""

    servers: list[Master]
    agents: list[Agent]
    db: Db
    capacity: int

    @property
    def master(self) -> Master:
        return self.servers[0]


@contextlib.contextmanager
def real_system(args, work: Path) -> Iterator[System]:
    servers: list[Master] = []
    agents: list[Agent] = []
    install = None
    try:
        if args.servers == 1:
            servers.append(launch(work, "real"))
        else:
            from tests.engines import ScaleOut

            install = ScaleOut.create()
            for i in range(args.servers):
                log(f"starting server {i + 1} of {args.servers} of one install")
                servers.append(Master.launch(work / f"real-{i}", **install.env))
        agents = start_agents(servers, args.agents, args.capacity)
        system = System(servers, agents, Db.of(servers[0]), args.agents * args.capacity)
        warm_up(system)
        yield system
    finally:
        for agent in agents:
            agent.stop()
        for server in servers:
            server.release()
        if install is not None:
            install.drop()


def warm_up(system: System) -> None:
    """As celery_bench does: 4 x slots runs at once, then 20 one by one; not measured."""
    task = system.master.create_task(name="warm-up", command="true")
    client = Client(system.master)
    client.json("POST", "/api/runs", {"task": task["id"], "count": 4 * system.capacity}, 201)
    system.db.wait_all_final(system.master, task["id"], timeout=60)
    for _ in range(20):
        run = client.json("POST", f"/api/tasks/{task['id']}/run", expect=201)
        wait_for(lambda r=run: system.db.status(r["id"]) in FINAL, 30, 0.002, "a warm-up run")
    client.close()
    time.sleep(0.5)


# --- throughput ------------------------------------------------------------------------


def trigger_by_clients(servers: list[Master], task_id: int, runs: int, clients: int) -> list[int]:
    """POST /api/tasks/<id>/run `runs` times from `clients` threads (client i to
    server i, mod their number); the statuses."""
    statuses: list[int] = []
    shares = [runs // clients + (i < runs % clients) for i in range(clients)]

    def client_loop(share: int, index: int) -> None:
        client = Client(servers[index % len(servers)])
        mine = [client.call("POST", f"/api/tasks/{task_id}/run")[0] for _ in range(share)]
        client.close()
        statuses.extend(mine)

    threads = [
        threading.Thread(target=client_loop, args=(share, index))
        for index, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def trigger_in_bulk(servers: list[Master], task_id: int, runs: int) -> list[int]:
    """POST /api/runs with count <= 1000 until `runs` are asked for, to each
    server in turn; the statuses."""
    clients = [Client(server) for server in servers]
    statuses = []
    for index, done in enumerate(range(0, runs, BULK_MAX)):
        count = min(BULK_MAX, runs - done)
        client = clients[index % len(clients)]
        statuses += [client.call("POST", "/api/runs", {"task": task_id, "count": count})[0]]
    for client in clients:
        client.close()
    return statuses


def measure_throughput(system: System, name: str, runs: int, trigger: Callable) -> dict:
    master = system.master
    task = master.create_task(name=name, command="true")
    before = cpu_of(system)
    cpu0, t0 = cpu_sample(), time.time()
    statuses = trigger(task["id"])
    triggered = time.time()
    system.db.wait_all_final(master, task["id"], timeout=120 + runs / 5)
    cpu1, t1 = cpu_sample(), time.time()
    after = cpu_of(system)
    rows = system.db.runs(task["id"])
    figures = throughput_figures(rows, runs, t0, triggered, t1)
    figures["trigger_responses"] = dict(Counter(str(s) for s in statuses))
    figures["cpu"] = cpu_window(cpu0, cpu1, runs)
    figures["cpu"].update(process_cpu(before, after, runs, figures["cpu"]))
    figures["wait"] = WAIT_NOTE.format(10)
    log(f"  {figures['runs_per_s']} runs/s, {figures['cpu'].get('cpu_ms_per_run')} CPU ms/run")
    return figures


def throughput_figures(rows: list[RunRow], runs: int, t0: float, triggered: float, t1: float):
    statuses = Counter(row.status for row in rows)
    first = min(row.created for row in rows)
    last = max(row.finished or row.created for row in rows)
    return {
        "runs": runs,
        "runs_found": len(rows),
        "statuses": dict(statuses),
        "not_succeeded": runs - statuses["succeeded"],
        # The definition: first run created -> last attempt finished.
        "runs_per_s": round(len(rows) / (last - first), 1),
        "span_s": round(last - first, 3),
        # celery_bench's: first request sent -> all seen final by the client.
        "runs_per_s_client": round(runs / (t1 - t0), 1),
        "wall_s": round(t1 - t0, 3),
        "trigger_s": round(triggered - t0, 3),
        "triggers_per_s": round(runs / (triggered - t0), 1),
        "created_to_started_ms": summary_ms(
            [r.started - r.created for r in rows if r.started is not None]
        ),
    }


def cpu_of(system: System) -> dict[str, float]:
    """CPU seconds so far of the server, the agents, the commands they ran, and this bench."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "server": sum(proc_cpu_s(server.proc.pid) for server in system.servers),
        "agents": sum(proc_cpu_s(a.proc.pid) for a in system.agents),
        "commands": sum(proc_cpu_s(a.proc.pid, children=True) for a in system.agents),
        "bench_client": usage.ru_utime + usage.ru_stime,
    }


def process_cpu(before: dict, after: dict, runs: int, machine: dict) -> dict:
    """CPU ms per run of each process, and what the machine spent beyond them: other
    sessions and kernel work charged to nobody (noise on a shared machine)."""
    ours = {name: 1000 * (after[name] - before[name]) / runs for name in before}
    figures = {f"{name}_cpu_ms_per_run": round(ms, 3) for name, ms in ours.items()}
    if "cpu_ms_per_run" in machine:
        figures["other_cpu_ms_per_run"] = round(machine["cpu_ms_per_run"] - sum(ours.values()), 3)
    return figures


def throughput_api(system: System, args) -> dict:
    log(f"throughput: {args.runs} runs from {args.clients} API clients")
    figures = measure_throughput(
        system,
        "true-api",
        args.runs,
        lambda task_id: trigger_by_clients(system.servers, task_id, args.runs, args.clients),
    )
    return {"clients": args.clients, "agents": args.agents, "capacity": args.capacity, **figures}


def throughput_bulk(system: System, args) -> dict:
    log(f"throughput: {args.runs} runs through POST /api/runs")
    figures = measure_throughput(
        system,
        "true-bulk",
        args.runs,
        lambda task_id: trigger_in_bulk(system.servers, task_id, args.runs),
    )
    return {"per_request": BULK_MAX, "agents": args.agents, "capacity": args.capacity, **figures}


# --- latency ------------------------------------------------------------------------


def latency(system: System, args) -> dict:
    log(f"latency: {args.latency_runs} runs one at a time")
    task = system.master.create_task(name="true-latency", command="true")
    # Through each server in turn: with several, half the runs cross to an agent
    # connected to another server.
    clients = [Client(server) for server in system.servers]
    for index in range(args.latency_runs):
        client = clients[index % len(clients)]
        run = client.json("POST", f"/api/tasks/{task['id']}/run", expect=201)
        wait_for(lambda r=run: system.db.status(r["id"]) in FINAL, 30, 0.001, "a run to finish")
    for client in clients:
        client.close()
    rows = system.db.runs(task["id"])
    statuses = Counter(row.status for row in rows)
    figures = {
        "runs": args.latency_runs,
        "statuses": dict(statuses),
        "not_succeeded": args.latency_runs - statuses["succeeded"],
        # Run created_at (server clock) -> the attempt's started_at and
        # finished_at (the agent's clock, on the same machine).
        "created_to_started_ms": summary_ms([r.started - r.created for r in rows if r.started]),
        # Split at the claim (server clock): the master's part, then delivery
        # and the agent's part.
        "created_to_assigned_ms": summary_ms([r.assigned - r.created for r in rows if r.assigned]),
        "assigned_to_started_ms": summary_ms(
            [r.started - r.assigned for r in rows if r.assigned and r.started]
        ),
        "created_to_finished_ms": summary_ms([r.finished - r.created for r in rows if r.finished]),
        "wait": WAIT_NOTE.format(1),
    }
    log(f"  created->started p50 {figures['created_to_started_ms'].get('p50')} ms")
    return figures


# --- fleet ----------------------------------------------------------------------------


class StateWatcher:
    """Reads every worker's state from the database twice a second, in a thread:
    which workers went from online to anything else (declared lost, or closed)."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.online: set[int] = set()
        self.left: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            for worker_id, state in self.db.all("SELECT id, state FROM workers_app_worker"):
                if state == "online":
                    self.online.add(worker_id)
                elif worker_id in self.online:
                    self.left.setdefault(worker_id, state)

    def close(self) -> dict[int, str]:
        self.stop.set()
        self.thread.join()
        return self.left


def fleet(args, work: Path) -> dict:
    with served(work, "fleet") as master:
        return measure_fleet(master, args)


def measure_fleet(master: Master, args) -> dict:
    pid, n = master.proc.pid, args.fleet
    rss_before = proc_kb(pid, "VmRSS")
    sim = Fleet(master.url, master.manage("enrollment-token", "--auto-approve"), n, capacity=1)
    began = time.monotonic()
    sim.register()
    registered = time.monotonic() - began
    log(f"fleet: {n} agents registered in {registered:.1f}s; connecting all at once")
    db = Db.of(master)
    watcher = StateWatcher(db)
    with sim:
        connected = sim.wait_welcomed(timeout=120 + n / 10)
        idle = measure_idle(pid, args.idle_s)
        rss_idle = proc_kb(pid, "VmRSS")
        steady = dispatch_steady(master, db, min(n, 500), rate=100)
        dispatched = dispatch_across(master, db, n)
        states = Counter(w["state"] for w in master.api("GET", "workers").json()["results"])
        # Before the fleet says goodbye: from then on, offline is what it should be.
        left = watcher.close()
    db.close()
    stats = sim.stats.summary()
    figures = {
        "agents": n,
        "heartbeat_s": stats["heartbeat_s"],
        "register_s": round(registered, 2),
        "connect_s": round(connected, 2),
        "server_rss_kb_before": rss_before,
        "server_rss_kb_idle": rss_idle,
        "rss_kb_per_agent": round((rss_idle - rss_before) / n, 1),
        "server_hwm_kb": proc_kb(pid, "VmHWM"),
        "idle": idle,
        # Workers the database showed online, then not (looks twice a second
        # over the whole phase): declared lost by the reaper, or disconnected.
        "declared_lost": len(left),
        "closed_by_server": stats["closed_by_server"],
        "reconnects": stats["welcomes"] - n,
        "worker_states_at_end": dict(states),
        "fleet": stats,
        # Runs one by one at a steady rate: what a run waits for in a big fleet.
        "runs_steady": steady,
        # One run per agent in one bulk request: how fast a burst spreads out.
        "runs": dispatched,
    }
    log(
        f"  RSS {rss_idle // 1024} MB, idle {idle['server_cpu_pct_one_core']}% of a core, "
        f"{figures['declared_lost']} lost, {figures['closed_by_server']} closed, "
        f"created->started p99 {steady['created_to_started_ms'].get('p99')} ms one by one, "
        f"{dispatched['created_to_started_ms'].get('p99')} ms for a burst of {n}"
    )
    return figures


def measure_idle(pid: int, seconds: float) -> dict:
    """The server's CPU while the fleet only heartbeats, after a moment to settle."""
    time.sleep(min(2.0, seconds))
    cpu0, own0, t0 = cpu_sample(), proc_cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, own1, t1 = cpu_sample(), proc_cpu_s(pid), time.monotonic()
    return {
        "seconds": round(t1 - t0, 1),
        "server_cpu_pct_one_core": round(100 * (own1 - own0) / (t1 - t0), 1),
        "machine_cpu_busy_pct_all_cores": cpu_window(cpu0, cpu1, 1).get("cpu_busy_pct_all_cores"),
    }


def dispatch_steady(master: Master, db: Db, runs: int, rate: float) -> dict:
    """`runs` runs triggered one at a time, `rate` a second, across the fleet."""
    task = master.create_task(name="true-fleet-steady", command="true")
    client = Client(master)
    statuses = []
    due = time.monotonic()
    for _ in range(runs):
        time.sleep(max(0.0, due - time.monotonic()))
        statuses.append(client.call("POST", f"/api/tasks/{task['id']}/run")[0])
        due += 1 / rate
    client.close()
    return {"rate_per_s": rate, **_dispatched(master, db, task["id"], runs, statuses)}


def dispatch_across(master: Master, db: Db, runs: int) -> dict:
    """One bulk request for `runs` runs, as many as there are agents."""
    task = master.create_task(name="true-fleet", command="true")
    statuses = trigger_in_bulk([master], task["id"], runs)
    return _dispatched(master, db, task["id"], runs, statuses)


def _dispatched(master: Master, db: Db, task_id: int, runs: int, statuses: list[int]) -> dict:
    db.wait_all_final(master, task_id, timeout=120 + runs / 10)
    rows = db.runs(task_id)
    states = Counter(row.status for row in rows)
    return {
        "runs": runs,
        "trigger_responses": dict(Counter(str(s) for s in statuses)),
        "statuses": dict(states),
        "not_succeeded": runs - states["succeeded"],
        "created_to_started_ms": summary_ms([r.started - r.created for r in rows if r.started]),
        "created_to_assigned_ms": summary_ms([r.assigned - r.created for r in rows if r.assigned]),
        "wait": WAIT_NOTE.format(10),
    }


# --- history ---------------------------------------------------------------------------


def history(args, work: Path) -> dict:
    with served(work, "history") as master:
        return measure_history(master, args)


def measure_history(master: Master, args) -> dict:
    log(f"history: seeding {args.history:,} runs")
    began = time.monotonic()
    master.manage("seedruns", str(args.history), "--tasks", str(HISTORY_TASKS))
    seeded = time.monotonic() - began
    log(f"  seeded in {seeded:.1f}s; timing the runs API and page")
    db = Db.of(master)
    oldest, count = db.one("SELECT MIN(id), COUNT(*) FROM tasks_app_run")
    task_id = db.one("SELECT id FROM tasks_app_task WHERE name = 'seed-01'")[0]
    db.close()
    # 1 % of the history from its oldest end, and at least a page past it.
    deep = oldest + count // 100 + 60
    filters = {
        "unfiltered": {},
        "task": {"task": task_id},
        "status": {"status": "failed"},
        "task_and_status": {"task": task_id, "status": "failed"},
    }
    api, page = Client(master), Client(master, {"Cookie": dashboard_cookie(master)})
    pid = master.proc.pid
    figures = {
        "runs_stored": count,
        "seed_s": round(seeded, 1),
        "deep_before": deep,
        "timing": "median round trip on localhost (an upper bound on server time) and "
        "the server's CPU ms per request (utime+stime over the samples)",
        "floor_api_404": time_requests(api, pid, "/api/runs/999999999999", args.samples, 404),
        "api": {},
        "page": {},
    }
    for depth, before in (("first", {}), ("deep", {"before": deep})):
        for name, query in filters.items():
            query = {**query, **before}
            qs = "&".join(f"{k}={v}" for k, v in query.items())
            key = f"{depth}_{name}"
            path = f"/api/runs?limit=50{'&' + qs if qs else ''}"
            figures["api"][key] = time_requests(api, pid, path, args.samples, count_results=True)
            figures["page"][key] = time_requests(page, pid, f"/runs/?{qs}", args.samples)
    api.close()
    page.close()
    worst = max(t["median_ms"] for kind in ("api", "page") for t in figures[kind].values())
    log(f"  slowest median round trip {worst} ms")
    return figures


def time_requests(
    client: Client, pid: int, path: str, samples: int, expect: int = 200, count_results=False
) -> dict:
    """Median round trip of `samples` GETs (after one not counted), and server CPU each."""
    status, body = client.call("GET", path)
    if status != expect:
        raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
    times = []
    cpu0 = proc_cpu_s(pid)
    for _ in range(samples):
        began = time.perf_counter()
        status, body = client.call("GET", path)
        times.append(time.perf_counter() - began)
        if status != expect:
            raise RuntimeError(f"GET {path}: {status}")
    cpu1 = proc_cpu_s(pid)
    result = {
        "path": path,
        "median_ms": round(1000 * statistics.median(times), 2),
        "max_ms": round(1000 * max(times), 2),
        "server_cpu_ms": round(1000 * (cpu1 - cpu0) / samples, 2),
    }
    if count_results:
        result["results"] = len(json.loads(body)["results"])
    return result


# --- output ---------------------------------------------------------------------------


def output(args, work: Path) -> dict:
    master = launch(work, "output")
    agents: list[Agent] = []
    try:
        agents = start_agents([master], 1, 1)
        return measure_output(master, agents[0], args.output_mb)
    finally:
        for agent in agents:
            agent.stop()
        master.release()


def measure_output(master: Master, agent: Agent, megabytes: int) -> dict:
    size = megabytes * 1024 * 1024
    log(f"output: a command printing {megabytes} MB")
    task = master.create_task(
        name="print-a-lot", command=f"head -c {size} /dev/zero | tr '\\0' x", shell=True
    )
    pids = {"server": master.proc.pid, "agent": agent.proc.pid}
    before = {name: proc_kb(pid, "VmHWM") for name, pid in pids.items()}
    db = Db.of(master)
    run = master.trigger(task["id"])
    db.wait_all_final(master, task["id"], timeout=600, every=0.05)
    # Peaks first: reading the output back through the API would grow the server.
    after = {name: proc_kb(pid, "VmHWM") for name, pid in pids.items()}
    row = db.runs(task["id"])[0]
    stored = db.one(
        "SELECT a.status, a.output_bytes, a.stored_bytes, a.truncated,"
        " (SELECT count(*) FROM tasks_app_logchunk c WHERE c.attempt_id = a.id),"
        " (SELECT coalesce(sum(length(c.data)), 0) FROM tasks_app_logchunk c"
        "  WHERE c.attempt_id = a.id)"
        " FROM tasks_app_attempt a WHERE a.run_id = ?",
        run["id"],
    )
    db.close()
    figures = {
        "printed_bytes": size,
        "status": row.status,
        "attempt_status": stored[0],
        "output_bytes": stored[1],
        "stored_bytes": stored[2],
        "truncated": bool(stored[3]),
        "log_chunks": stored[4],
        "log_chars": stored[5],
        "created_to_finished_s": round(row.finished - row.created, 2) if row.finished else None,
        "peak_rss_kb_before": before,
        "peak_rss_kb_after": after,
        "peak_rss_growth_kb": {name: after[name] - before[name] for name in pids},
        "wait": WAIT_NOTE.format(50),
    }
    log(f"  peak RSS growth {figures['peak_rss_growth_kb']} kB")
    return figures


# --- command line ---------------------------------------------------------------------


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:,} and {hi:,}, not {value:,}")
        return value

    return parse


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}; use some of {', '.join(SECTIONS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--runs", type=_whole(1, 100_000), default=2000, help="throughput runs (2000)")
    add("--clients", type=_whole(1, 64), default=8, help="concurrent API clients (8)")
    add("--agents", type=_whole(1, 32), default=1, help="real agents for throughput/latency (1)")
    add("--capacity", type=_whole(1, 1024), default=4, help="slots per real agent (4)")
    add("--latency-runs", type=_whole(1, 100_000), default=200, help="sequential runs (200)")
    add("--fleet", type=_whole(1, 10_000), default=1000, help="simulated agents (1000)")
    add("--idle-s", type=_whole(1, 3600), default=15, help="fleet idle window, seconds (15)")
    add("--history", type=_whole(1, 50_000_000), default=1_000_000, help="seeded runs (1000000)")
    add("--samples", type=_whole(1, 10_000), default=20, help="requests per history figure (20)")
    add("--output-mb", type=_whole(1, 100_000), default=100, help="MB the command prints (100)")
    add("--only", type=_sections, default=list(SECTIONS), help="SECTION[,SECTION...] (all)")
    add(
        "--engine",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="sqlite: the embedded default; postgres: PostgreSQL + Redis (127.0.0.1, or"
        " SCHEDULER_TEST_POSTGRES / SCHEDULER_TEST_REDIS), a database of its own per server"
        " or install, dropped after",
    )
    add(
        "--servers",
        type=_whole(1, 8),
        default=1,
        help="server processes of one install for throughput/latency (1; more needs"
        " --engine postgres); agents and API clients are spread over them",
    )
    add("--keep", action="store_true", help="keep the work dir (logs; databases are dropped)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.servers > 1 and args.engine != "postgres":
        parser.error(
            f"--servers {args.servers}: several servers of one install need --engine postgres"
            " (SQLite and the in-memory layer serve one process)"
        )


def run_sections(args, work: Path) -> dict:
    report: dict = {}
    with contextlib.ExitStack() as stack:
        system: System | None = None
        for name in SECTIONS:
            if name not in args.only:
                continue
            began = time.monotonic()
            try:
                if name in ("throughput_api", "throughput_bulk", "latency"):
                    system = system or stack.enter_context(real_system(args, work))
                    report[name] = globals()[name](system, args)
                else:
                    report[name] = globals()[name](args, work)
            except Exception as exc:  # one broken section must not hide the others' figures
                log(f"{name} failed:\n{traceback.format_exc()}")
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            report[name]["section_s"] = round(time.monotonic() - began, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.engine == "postgres":
        from tests import engines

        # Each server started below (harness.Master) makes a database and a Redis
        # prefix of its own from these; several servers share one (real_system).
        os.environ["DATABASE_URL"] = engines.ADMIN_URL
        os.environ["REDIS_URL"] = engines.REDIS_URL
    began = time.monotonic()
    report = {
        "harness": "tests/bench.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": git_revision(),
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "keep"},
        "server": (
            "manage.py serve, embedded default (SQLite WAL + in-memory channel layer)"
            if args.engine == "sqlite"
            else f"manage.py serve x {args.servers} (throughput/latency), PostgreSQL + Redis"
        ),
    }
    work = Path(tempfile.mkdtemp(prefix="scheduler-bench-"))
    try:
        report.update(run_sections(args, work))
    finally:
        failed = any("error" in report.get(name, {}) for name in args.only)
        if args.keep or failed:
            report["work_dir"] = str(work)
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["duration_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
