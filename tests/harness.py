"""Real processes for end-to-end tests and the benchmark.

A `Master` is a real `manage.py serve` on a free port with its own data dir;
`spawn_agent` starts a real agent process; `CuttableProxy` is the network
between them, which a test can cut. conftest.py wraps these in fixtures and
`tests/bench.py` uses them directly, so both run the same system.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.engines import ScaleOut, create_database, create_prefix

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "workers_app" / "agent.py"

# Short intervals so that liveness tests finish quickly.
FAST_SETTINGS = {
    "SCHEDULER_HEARTBEAT_S": "0.5",
    "SCHEDULER_LOST_AFTER_S": "3",
    "SCHEDULER_TICK_S": "0.2",
}


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (proc(5) field 3
    on: state, ppid, ..., utime at index 11). Raises FileNotFoundError."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        state = proc_stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], object], timeout: float = 20, interval: float = 0.05, what: str = ""
):
    """Poll until condition() is truthy; return its value or fail with what we waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def own_engines(env: dict[str, str]) -> ScaleOut | None:
    """When env is on PostgreSQL/Redis (DATABASE_URL or REDIS_URL: the test run
    itself is), a database and a key prefix made for one install alone, put in
    env; the caller drops them. None on SQLite and the in-memory layer."""
    if not (env.get("DATABASE_URL") or env.get("REDIS_URL")):
        return None
    owned = ScaleOut(
        create_database() if env.get("DATABASE_URL") else "",
        create_prefix() if env.get("REDIS_URL") else "",
    )
    if owned.database_url:
        env["DATABASE_URL"] = owned.database_url
    if owned.prefix:
        env["SCHEDULER_REDIS_PREFIX"] = owned.prefix
    return owned


@dataclass
class Master:
    url: str
    port: int
    data_dir: Path
    env: dict
    token: str = ""
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    session: requests.Session = field(default_factory=requests.Session)
    # A database and Redis prefix made for this server alone, dropped by release().
    owned: ScaleOut | None = None

    @classmethod
    def launch(cls, data_dir: Path, **overrides: str) -> Master:
        """Migrate a fresh data dir, mint an admin API token, start serving.

        When the test run itself is on PostgreSQL/Redis (DATABASE_URL or
        REDIS_URL set: the whole suite run against the real engines), the
        server gets a database and a key prefix of its own, never the test
        run's; a caller that passes DATABASE_URL shares that one (several
        servers of one install).
        """
        port = free_port()
        env = {**os.environ, "SCHEDULER_DATA_DIR": str(data_dir), **overrides}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        inherited = "DATABASE_URL" not in overrides and "REDIS_URL" not in overrides
        owned = own_engines(env) if inherited else None
        server = cls(
            url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, env=env, owned=owned
        )
        try:
            server.manage("migrate", "-v0")
            server.manage("ensureadmin")
            server.token = server.manage("apitoken", "admin")
            server.start()
        except BaseException:
            server.release()
            raise
        return server

    def release(self) -> None:
        """Stop, and drop what was made for this server alone."""
        self.stop()
        if self.owned is not None:
            self.owned.drop()
            self.owned = None

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def start(self) -> None:
        self.log_path = self.data_dir / f"serve-{int(time.time() * 1000)}.log"
        with self.log_path.open("w") as log:  # the server holds its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._up, timeout=30, what=f"the server on {self.url}")
        except BaseException:
            self.stop()  # a server that never came up must not outlive the test
            raise

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"server exited: {self.log_path.read_text()}"
        try:
            requests.get(f"{self.url}/login/", timeout=1)
            return True
        except requests.ConnectionError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return self.session.request(
            method, f"{self.url}/api/{path}", headers=headers, timeout=10, **kwargs
        )

    def logged_in(self, password_from: Master | None = None) -> requests.Session:
        """A session logged in to the dashboard as admin, whose password the
        install's first server wrote (another server of the install shares it)."""
        session = requests.Session()
        session.get(f"{self.url}/login/")
        password = ((password_from or self).data_dir / "admin-password.txt").read_text().strip()
        landed = session.post(
            f"{self.url}/login/",
            data={
                "username": "admin",
                "password": password,
                "csrfmiddlewaretoken": session.cookies["csrftoken"],
            },
        )
        assert landed.url == f"{self.url}/", landed.text  # the overview
        return session

    def run_of(self, run_id: int) -> dict:
        response = self.api("GET", f"runs/{run_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def worker_state(self, name: str) -> str | None:
        workers = self.api("GET", "workers").json()["results"]
        return next((w["state"] for w in workers if w["name"] == name), None)

    def create_task(self, **task) -> dict:
        response = self.api("POST", "tasks", json=task)
        assert response.status_code == 201, response.text
        return response.json()

    def trigger(self, task_id: int) -> dict:
        response = self.api("POST", f"tasks/{task_id}/run")
        assert response.status_code == 201, response.text
        return response.json()

    def wait_final(self, run_id: int, timeout: float = 30) -> dict:
        final = {"succeeded", "failed", "cancelled", "skipped"}

        def done():
            run = self.run_of(run_id)
            return run if run["status"] in final else None

        return wait_for(done, timeout=timeout, what=f"run {run_id} to finish")


class CuttableProxy:
    """A TCP relay between agents and the master whose links the test can cut.

    It stands in for the network, which is outside the system under test:
    cut() drops every open connection and refuses new ones until heal().
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open = threading.Event()
        self.open.set()
        self.links: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if not self.open.is_set():  # cut() ran while we connected
                    client.close()
                    upstream.close()
                    continue
                self.links += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            links, self.links = self.links, []
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.listener.close()


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen
    state_dir: Path
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        """SIGTERM (a drain), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text()


def spawn_agent(
    server: str,
    enrollment: str,
    workdir: Path,
    *,
    name: str,
    capacity: int = 2,
    labels: str = "",
    extra: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Agent:
    """A real agent process; the same name and workdir reuse its state dir (a restart)."""
    state_dir = workdir / "agents" / name
    log_path = log_path or workdir / f"agent-{name}.log"
    args = [sys.executable, str(AGENT), "--server", server, "--token", enrollment]
    args += ["--name", name, "--capacity", str(capacity), "--state-dir", str(state_dir), *extra]
    if labels:
        args += ["--labels", labels]
    with log_path.open("w") as log:  # the agent holds its own copy
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    return Agent(name=name, proc=proc, state_dir=state_dir, log_path=log_path)
