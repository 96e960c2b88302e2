"""A simulated fleet: many lightweight agents in one asyncio process.

Each simulated agent registers over the real API and speaks the real protocol
over a real websocket: hello, a heartbeat every `heartbeat_s` of the welcome,
and for every assign `accepted` + `started` + `finished` at once, as one
message. It runs no command, so one process holds a thousand of them; what it
measures is the master. tests/test_fleet.py (liveness under load) and the
benchmark's fleet section (tests/bench.py) both use it:

    fleet = Fleet(master.url, enrollment_token, n=300)
    fleet.register()
    with fleet:                       # connects all of them at once
        fleet.wait_welcomed(timeout=30)
        ...                           # heartbeats go on in the background
    fleet.stats.summary()

Or by hand against a running server:
    .venv/bin/python tests/fleet.py --server http://127.0.0.1:8000 --token ENR -n 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scheduler_site.wire import (  # noqa: E402
    CLOSE_BAD_CREDENTIAL,
    CLOSE_REVOKED,
    PROTOCOL_VERSION,
)

AGENT_VERSION = "fleet-sim"
# A real agent backs off before reconnecting; a fixed second is enough here.
RECONNECT_S = 1.0
# A thousand handshakes at once queue up in the server's listen backlog and
# its thread pool: give them longer than the client library's 10 s.
OPEN_TIMEOUT_S = 60.0
# Codes after which a real agent stops instead of reconnecting.
FINAL_CLOSE_CODES = (CLOSE_BAD_CREDENTIAL, CLOSE_REVOKED)


@dataclass
class FleetStats:
    """What the fleet saw of the master, counted over its whole life."""

    welcomes: int = 0  # a reconnect's hello counts again
    heartbeat_s: float | None = None  # as the welcome said
    heartbeats: int = 0
    assigns: int = 0
    duplicate_assigns: int = 0
    acks: int = 0
    errors: list[dict] = field(default_factory=list)  # error frames, as received
    server_closes: Counter = field(default_factory=Counter)  # close code -> count
    # Connections that ended without a close frame from either side.
    drops: int = 0
    connect_failures: int = 0
    # Sessions that ended on something this simulator did not expect.
    crashes: list[str] = field(default_factory=list)
    other_frames: Counter = field(default_factory=Counter)
    welcomed: set[str] = field(default_factory=set)  # agents welcomed at least once

    def summary(self) -> dict:
        return {
            "welcomes": self.welcomes,
            "heartbeat_s": self.heartbeat_s,
            "heartbeats": self.heartbeats,
            "assigns": self.assigns,
            "duplicate_assigns": self.duplicate_assigns,
            "acks": self.acks,
            "error_frames": len(self.errors),
            "error_samples": self.errors[:5],
            "closed_by_server": sum(self.server_closes.values()),
            "server_close_codes": {str(code): n for code, n in self.server_closes.items()},
            "dropped": self.drops,
            "connect_failures": self.connect_failures,
            "crashes": len(self.crashes),
            "crash_samples": self.crashes[:5],
            "other_frames": dict(self.other_frames),
        }


def _frames(message: str | bytes) -> list[dict]:
    """A message is one frame or (protocol 2) an array of frames."""
    data = json.loads(message)
    return data if isinstance(data, list) else [data]


def _done(attempt: int, at: float) -> list[dict]:
    """What an agent says about a command that started and succeeded at once."""
    return [
        {"type": "accepted", "attempt": attempt},
        {"type": "started", "attempt": attempt, "pid": None, "started_at": at},
        {
            "type": "finished",
            "attempt": attempt,
            "status": "succeeded",
            "exit_code": 0,
            "reason": "",
            "started_at": at,
            "finished_at": time.time(),
            "output_bytes": 0,
            "truncated": False,
            "last_seq": -1,
        },
    ]


class SimAgent:
    """One simulated agent: a websocket, a heartbeat timer and nothing else."""

    def __init__(self, fleet: Fleet, name: str, credential: str) -> None:
        self.fleet = fleet
        self.name = name
        self.credential = credential
        self.protocol = PROTOCOL_VERSION  # until the welcome says which
        self.answered: set[int] = set()
        # Results sent but not acknowledged: replayed after a reconnect, as a
        # real agent replays its spool.
        self.unacked: dict[int, list[dict]] = {}
        self.socket: ClientConnection | None = None

    async def live(self) -> None:
        stats = self.fleet.stats
        while not self.fleet.stopping:
            try:
                async with connect(
                    self.fleet.ws_url,
                    additional_headers={"Authorization": f"Bearer {self.credential}"},
                    # Keep each connection cheap: no compression context, no pings
                    # of our own (the heartbeats are the sign of life).
                    compression=None,
                    ping_interval=None,
                    open_timeout=OPEN_TIMEOUT_S,
                    proxy=None,
                    max_size=None,
                ) as ws:
                    self.socket = ws
                    code = await self._session(ws)
            except (OSError, TimeoutError, InvalidHandshake):
                stats.connect_failures += 1
                code = None
            except Exception as exc:  # a frame we did not expect: count it, carry on
                stats.crashes.append(f"{self.name}: {exc!r}")
                code = None
            finally:
                self.socket = None
            if self.fleet.stopping or code in FINAL_CLOSE_CODES:
                return
            await asyncio.sleep(RECONNECT_S)

    async def _session(self, ws: ClientConnection) -> int | None:
        """Hello, then answer until the socket closes; the server's close code, if any."""
        await ws.send(json.dumps(self._hello()))
        beating: asyncio.Task | None = None
        try:
            async for message in ws:
                replies: list[dict] = []
                for frame in _frames(message):
                    replies += self._on_frame(frame)
                    if frame.get("type") == "welcome" and beating is None:
                        beating = asyncio.create_task(self._heartbeat(ws, frame["heartbeat_s"]))
                await self._send(ws, replies)
        except ConnectionClosed:
            pass
        finally:
            if beating is not None:
                beating.cancel()
        return self._count_close(ws)

    async def _send(self, ws: ClientConnection, frames: list[dict]) -> None:
        """Protocol 2: all of them as one message; protocol 1: one message each."""
        if self.protocol >= 2 and frames:
            await ws.send(json.dumps(frames))
        else:
            for frame in frames:
                await ws.send(json.dumps(frame))

    def _hello(self) -> dict:
        return {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "hostname": socket.gethostname(),
            "name": self.name,
            "capacity": self.fleet.capacity,
            "labels": [],
            "running": [],
            "spooled": sorted(self.unacked),
        }

    def _on_frame(self, frame: dict) -> list[dict]:
        stats = self.fleet.stats
        kind = frame.get("type")
        if kind == "welcome":
            stats.welcomes += 1
            stats.welcomed.add(self.name)
            stats.heartbeat_s = frame["heartbeat_s"]
            self.protocol = frame["protocol"]
            return [f for frames in self.unacked.values() for f in frames[2:]]
        if kind == "assign":
            attempt = frame["attempt"]
            if attempt in self.answered:
                # A resend (e.g. after a reconnect): repeat the result unless it was stored.
                stats.duplicate_assigns += 1
                return self.unacked.get(attempt, [])[2:]
            self.answered.add(attempt)
            stats.assigns += 1
            self.unacked[attempt] = frames = _done(attempt, time.time())
            return frames
        if kind == "ack":
            stats.acks += 1
            self.unacked.pop(frame.get("attempt"), None)
        elif kind == "error":
            stats.errors.append(frame)
        else:
            stats.other_frames[kind] += 1
        return []

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        frame = json.dumps({"type": "heartbeat", "running": [], "draining": False})
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await ws.send(frame)
                self.fleet.stats.heartbeats += 1

    def _count_close(self, ws: ClientConnection) -> int | None:
        if self.fleet.stopping:
            return None  # we closed it
        received = ws.protocol.close_rcvd
        if received is None:
            self.fleet.stats.drops += 1
            return None
        self.fleet.stats.server_closes[received.code] += 1
        return received.code


class Fleet:
    """N simulated agents of one server, run by an event loop in a background thread."""

    def __init__(
        self, server_url: str, enrollment: str, n: int, capacity: int = 1, prefix: str = "sim"
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.ws_url = self.server_url.replace("http", "ws", 1) + "/ws/agent/"
        self.enrollment = enrollment
        self.names = [f"{prefix}-{i:04d}" for i in range(n)]
        self.capacity = capacity
        self.credentials: dict[str, str] = {}
        self.stats = FleetStats()
        self.agents: list[SimAgent] = []
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- registration, over the real API ------------------------------------------

    def register(self, threads: int = 4) -> None:
        """Enroll every agent by name (POST /api/workers/register) and keep its credential."""
        with ThreadPoolExecutor(threads) as pool:
            for name, credential in pool.map(self._register_one, self.names):
                self.credentials[name] = credential

    def _register_one(self, name: str) -> tuple[str, str]:
        body = {
            "token": self.enrollment,
            "name": name,
            "hostname": socket.gethostname(),
            "capacity": self.capacity,
            "labels": [],
        }
        response = requests.post(f"{self.server_url}/api/workers/register", json=body, timeout=60)
        if response.status_code != 201:
            raise RuntimeError(f"registering {name}: {response.status_code} {response.text}")
        return name, response.json()["credential"]

    # --- running -------------------------------------------------------------------

    def start(self) -> None:
        """Connect every agent at once; they live in a background thread until stop()."""
        if not self.credentials:
            self.register()
        _raise_fd_limit(len(self.names) + 256)
        self.thread = threading.Thread(target=self._run_loop, name="fleet", daemon=True)
        self.thread.start()
        self._ready.wait()
        if not self.thread.is_alive():
            raise RuntimeError("the fleet's event loop failed to start (its error is above)")

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()  # start() must not wait for a loop that died

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.agents = [SimAgent(self, name, self.credentials[name]) for name in self.names]
        tasks = [asyncio.create_task(agent.live()) for agent in self.agents]
        self._ready.set()
        await self._stop.wait()
        self.stopping = True
        sockets = [agent.socket for agent in self.agents if agent.socket is not None]
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        # Agents still connecting have no socket to close: they are cancelled.
        _, connecting = await asyncio.wait(tasks, timeout=10)
        for task in connecting:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, timeout: float = 30) -> FleetStats:
        """Close every socket (code 1000) and wait for the agents to end."""
        if self.thread is None:
            return self.stats
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the fleet did not stop within {timeout}s")
        self.thread = None
        return self.stats

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_welcomed(self, timeout: float) -> float:
        """Block until every agent got its welcome; seconds it took. Raises TimeoutError."""
        began = time.monotonic()
        deadline = began + timeout
        while len(self.stats.welcomed) < len(self.names):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.stats.welcomed)} of {len(self.names)} agents welcomed after "
                    f"{timeout}s: {self.stats.summary()}"
                )
            time.sleep(0.05)
        return time.monotonic() - began


def _raise_fd_limit(wanted: int) -> None:
    """One socket per agent: a thousand of them exceed the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Connect N simulated agents to a server.")
    parser.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="an enrollment token")
    parser.add_argument("-n", type=int, default=100, help="how many agents (default 100)")
    parser.add_argument("--capacity", type=int, default=1, help="slots per agent (default 1)")
    parser.add_argument("--seconds", type=float, default=60, help="how long to stay (default 60)")
    parser.add_argument("--prefix", default="sim", help="worker names are PREFIX-0000, ...")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 100_000 or not 1 <= args.capacity <= 1024 or args.seconds <= 0:
        parser.error("need 1 <= -n <= 100000, 1 <= --capacity <= 1024 and --seconds > 0")
    fleet = Fleet(args.server, args.token, args.n, args.capacity, args.prefix)
    fleet.register()
    with fleet:
        print(f"welcomed in {fleet.wait_welcomed(120):.1f}s", file=sys.stderr)
        time.sleep(args.seconds)
    print(json.dumps(fleet.stats.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
