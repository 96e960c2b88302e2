"""scheduler-agent: runs the master's assignments as real processes on this node.

A single file on purpose: the master serves it for download, so it may only
use the stdlib, `websockets` and `requests`, and never imports Django or the
project.

Two layers, as in python-websockets:

- AgentCore is the protocol with no I/O. It takes frames and events (a
  process started, printed bytes, exited) and returns outputs: frames to send
  (Send) and actions for the shell (StartProcess, KillProcess, WriteSpool,
  RemoveSpool, Welcomed). Unit tests drive it with exact frames.
- Agent is the asyncio shell: the websocket, process groups, pipes, timers
  and the spool directory. It decides nothing the core can decide.

SIGTERM/SIGINT drains: new assigns are rejected and running commands get
--drain-timeout seconds to finish before they are killed and reported lost; a
second signal kills at once. With no master for the welcome's fence_after_s,
running commands are killed (self-fencing) so a retry elsewhere never overlaps
them.

Usage: scheduler-agent --server http://HOST:PORT --token TOKEN [--capacity 4]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1

# Defaults until the master's welcome says otherwise.
DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_LOG_LIMIT_BYTES = 4 * 1024 * 1024
MAX_FRAME_BYTES = 1024 * 1024

READ_BYTES = 64 * 1024  # one os.read per wake-up; small reads cost a syscall per line
LOG_BATCH_BYTES = 64 * 1024
LOG_FLUSH_S = 0.1
# SIGTERM -> SIGKILL grace for cancel, timeout and shutdown. Read at call time so
# tests can lower it.
KILL_GRACE_S = 5.0
# The websocket's own keepalive: a half-open connection (a partition without a
# FIN) is noticed within PING_INTERVAL_S + PING_TIMEOUT_S, so that self-fencing
# starts counting soon after the master stops hearing us.
# Close codes of the master that mean "do not come back with this credential".
CLOSE_REVOKED = 4403
CLOSE_REPLACED = 4409
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
# How long a shutdown waits for queued frames to leave before closing the socket.
SEND_FLUSH_S = 3.0
# After a drain timeout killed what was still running: how long to wait for the
# master to acknowledge those results (the spool replays them on the next start).
DRAIN_ACK_WAIT_S = 5.0
# Upper bound between two self-fence checks while no deadline is known.
FENCE_POLL_S = 1.0

BACKOFF_INITIAL_S = 0.5
BACKOFF_CAP_S = 15.0

STREAMS = ("stdout", "stderr")
LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

logger = logging.getLogger("scheduler_agent")


class RegistrationRefused(Exception):
    """The master refused the enrollment token or the worker's details."""


class CredentialError(Exception):
    """The stored credential file is unreadable or malformed."""


# --------------------------------------------------------------------------
# Outputs of the core


@dataclass(frozen=True)
class Send:
    frame: dict[str, Any]


@dataclass(frozen=True)
class StartProcess:
    attempt: int
    argv: list[str]
    env: dict[str, str]  # overlay on top of os.environ
    cwd: str | None
    timeout: float | None


@dataclass(frozen=True)
class KillProcess:
    attempt: int


@dataclass(frozen=True)
class WriteSpool:
    attempt: int
    frame: dict[str, Any]


@dataclass(frozen=True)
class RemoveSpool:
    attempt: int


@dataclass(frozen=True)
class Welcomed:
    worker_id: Any
    heartbeat_s: float


Output = Send | StartProcess | KillProcess | WriteSpool | RemoveSpool | Welcomed


# --------------------------------------------------------------------------
# Protocol core (no I/O)


@dataclass
class _Attempt:
    id: int
    timeout: float | None
    started_at: float | None = None
    kill_reason: str | None = None  # "cancelled" | "timed_out" | "lost"
    lost_reason: str = ""  # why a "lost" kill happened (drain timeout, self-fence)
    next_seq: int = 0
    output_bytes: int = 0  # produced by the process
    kept_bytes: int = 0  # counted against the log limit (sent or queued)
    truncated: bool = False
    pending: dict[str, bytearray] = field(default_factory=lambda: {s: bytearray() for s in STREAMS})
    decoders: dict[str, codecs.IncrementalDecoder] = field(
        default_factory=lambda: {
            s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS
        }
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AgentCore:
    """The agent's side of protocol 1 as a state machine without I/O."""

    def __init__(
        self,
        *,
        name: str,
        hostname: str,
        capacity: int,
        labels: Sequence[str] = (),
        spooled: Iterable[dict[str, Any]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.hostname = hostname
        self.capacity = capacity
        self.labels = list(labels)
        self.worker_id: Any = None
        self.heartbeat_s = DEFAULT_HEARTBEAT_S
        self.log_limit_bytes = DEFAULT_LOG_LIMIT_BYTES
        self.max_frame_bytes = MAX_FRAME_BYTES
        self.connected = False  # a socket is open
        self.online = False  # ... and the master welcomed us
        self.draining = False  # reject assigns (master's drain, or shutting down)
        self.shutting_down = False  # SIGTERM/SIGINT: a resume must not undo the drain
        self.drain_timeout: float | None = None
        # Only the injected clock measures the time without the master, so tests can
        # move it instead of sleeping.
        self.clock = clock
        self.fence_after_s: float | None = None  # None: never self-fence
        self._offline_since: float | None = None
        self._running: dict[int, _Attempt] = {}
        # Finished frames the master has not acknowledged, replayed on every welcome.
        self._unacked: dict[int, dict[str, Any]] = {}
        # accepted/started frames produced offline or that did not leave before a drop.
        self._outbox: list[dict[str, Any]] = []
        # Every log frame sent or queued, per attempt in seq order, until a log_ack
        # covers it: a frame written just before the socket broke may never have
        # reached the master. Bounded by log_limit_bytes per attempt, and dropped
        # with the ack of the attempt's finished frame.
        self._logs: dict[int, list[dict[str, Any]]] = {}
        for frame in spooled:
            if _is_int(frame.get("attempt")) and frame.get("type") == "finished":
                self._unacked[frame["attempt"]] = frame

    # -- state ------------------------------------------------------------

    @property
    def running_ids(self) -> list[int]:
        return sorted(self._running)

    @property
    def unacked_ids(self) -> list[int]:
        return sorted(self._unacked)

    @property
    def unacked_logs(self) -> dict[int, list[int]]:
        """Seqs of the log frames kept for a resend, per attempt."""
        return {a: [f["seq"] for f in frames] for a, frames in sorted(self._logs.items())}

    @property
    def drained(self) -> bool:
        """Nothing running and every result acknowledged: a shutdown may close now."""
        return not self._running and not self._unacked

    @property
    def fence_due(self) -> float | None:
        """Clock time at which check_fence() kills, or None if nothing is at stake."""
        if self.fence_after_s is None or self.online or self._offline_since is None:
            return None
        if not any(a.kill_reason is None for a in self._running.values()):
            return None
        return self._offline_since + self.fence_after_s

    @property
    def has_pending_logs(self) -> bool:
        return any(buf for a in self._running.values() for buf in a.pending.values())

    @property
    def _batch_bytes(self) -> int:
        # JSON escaping can grow text up to 6x (\u0000); stay well inside the frame limit.
        return max(1024, min(LOG_BATCH_BYTES, self.max_frame_bytes // 8))

    # -- connection events ----------------------------------------------

    def connection_opened(self) -> list[Output]:
        self.connected = True
        self.online = False
        return [Send(self.hello())]

    def connection_lost(self, unsent: Sequence[dict[str, Any]] = ()) -> None:
        """Forget the socket; keep accepted/started frames that did not leave."""
        self.connected = False
        self.online = False
        # The fence clock runs from the drop across every reconnect attempt; a socket
        # that opens but is never welcomed does not restart it.
        if self._offline_since is None:
            self._offline_since = self.clock()
        # log frames are all kept until log_ack and finished frames are in the spool;
        # hello/heartbeat/rejected are stale.
        keep = [f for f in unsent if f.get("type") in ("accepted", "started")]
        self._outbox[:0] = keep

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "hostname": self.hostname,
            "name": self.name,
            "capacity": self.capacity,
            "labels": list(self.labels),
            # Finished-but-unacked attempts are not running: their results are
            # replayed right after the welcome. Listing them lets the master
            # wait for those results instead of declaring the attempts lost.
            "running": self.running_ids,
            "spooled": self.unacked_ids,
            "draining": self.draining,
        }

    def heartbeat(self) -> list[Output]:
        if not self.online:
            return []
        return [Send({"type": "heartbeat", "running": self.running_ids, "draining": self.draining})]

    # -- frames from the master ---------------------------------------------

    def receive(self, text: str | bytes) -> list[Output]:
        """Handle one frame from the master; malformed input is logged, never raised."""
        try:
            frame = json.loads(text)
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring malformed frame from master: %s", exc)
            return []
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            logger.warning("ignoring frame without a type from master: %.200r", frame)
            return []
        handler = getattr(self, "_on_" + frame["type"], None)
        if handler is None:
            logger.warning("ignoring unknown frame type %r from master", frame["type"])
            return []
        try:
            return handler(frame)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A master bug must not take the node's running processes down with it.
            logger.warning("ignoring malformed %s frame (%s): %.200r", frame["type"], exc, frame)
            return []

    def _on_welcome(self, frame: dict[str, Any]) -> list[Output]:
        self.worker_id = frame.get("worker_id")
        heartbeat_s = frame.get("heartbeat_s", DEFAULT_HEARTBEAT_S)
        if _is_number(heartbeat_s) and heartbeat_s > 0:
            self.heartbeat_s = float(heartbeat_s)
        log_limit = frame.get("log_limit_bytes", DEFAULT_LOG_LIMIT_BYTES)
        if _is_int(log_limit) and log_limit >= 0:
            self.log_limit_bytes = log_limit
        max_frame = frame.get("max_frame_bytes", MAX_FRAME_BYTES)
        if _is_int(max_frame) and max_frame > 0:
            self.max_frame_bytes = max_frame
        fence = frame.get("fence_after_s")
        if fence is not None and not (_is_number(fence) and fence > 0):
            logger.warning("ignoring fence_after_s %.50r: not a positive number", fence)
            fence = None
        self.fence_after_s = float(fence) if fence is not None else None
        self.online = self.connected
        if self.online:
            self._offline_since = None
        out: list[Output] = [Welcomed(self.worker_id, self.heartbeat_s)]
        # started before logs before finished, per attempt: the master de-duplicates
        # logs by (attempt, seq) but stores a finished result only once.
        out += [Send(f) for f in self._outbox]
        self._outbox.clear()
        for attempt in sorted(self._logs):
            out += [Send(f) for f in self._logs[attempt]]
        out += [Send(self._unacked[a]) for a in sorted(self._unacked)]
        return out

    def _on_assign(self, frame: dict[str, Any]) -> list[Output]:
        attempt = frame.get("attempt")
        if not _is_int(attempt):
            logger.warning("ignoring assign without an attempt id: %.200r", frame)
            return []
        if attempt in self._running:
            return []  # the master repeated itself; the first assign is in force
        if attempt in self._unacked:
            # Already ran here; the master has not stored the result yet.
            return [Send(self._unacked[attempt])]
        problem = _assign_problem(frame)
        if problem:
            return [self._reject(attempt, f"invalid assign: {problem}")]
        if self.draining:
            return [self._reject(attempt, "agent is draining")]
        if len(self._running) >= self.capacity:
            return [self._reject(attempt, f"agent at capacity ({self.capacity} running)")]
        argv = (
            list(frame["argv"])
            if frame.get("argv") is not None
            else ["/bin/sh", "-c", frame["shell"]]
        )
        env = {str(k): v for k, v in (frame.get("env") or {}).items()}
        env.update(
            SCHEDULER_RUN_ID=str(frame.get("run", "")),
            SCHEDULER_ATTEMPT_ID=str(attempt),
            SCHEDULER_TASK_NAME=str(frame.get("task_name") or ""),
            SCHEDULER_SHARD_INDEX=str(frame.get("shard_index", 0)),
            SCHEDULER_SHARD_COUNT=str(frame.get("shard_count", 1)),
        )
        timeout = frame.get("timeout")
        self._running[attempt] = _Attempt(id=attempt, timeout=timeout)
        logger.info("assigned attempt %s (%s)", attempt, frame.get("task_name") or "?")
        return [
            self._reply({"type": "accepted", "attempt": attempt}),
            StartProcess(attempt, argv, env, frame.get("cwd"), timeout),
        ]

    def _on_cancel(self, frame: dict[str, Any]) -> list[Output]:
        # Keyed by what runs here, not by what the master last assigned: after a
        # reconnect the master may have re-queued the attempt, and the process still
        # has to stop. An attempt that already finished (or never ran) has nothing to kill.
        a = self._running.get(frame.get("attempt"))  # type: ignore[arg-type]
        if a is None:
            return []
        a.kill_reason = a.kill_reason or "cancelled"
        logger.info("cancelling attempt %s", a.id)
        return [KillProcess(a.id)]

    def _on_ack(self, frame: dict[str, Any]) -> list[Output]:
        attempt = frame.get("attempt")
        if attempt not in self._unacked:
            return []
        del self._unacked[attempt]
        # The master stored the result, so it has every log frame up to last_seq.
        self._logs.pop(attempt, None)
        return [RemoveSpool(attempt)]

    def _on_log_ack(self, frame: dict[str, Any]) -> list[Output]:
        attempt, seq = frame.get("attempt"), frame.get("seq")
        if not _is_int(attempt) or not _is_int(seq):
            logger.warning("ignoring log_ack without an attempt and seq: %.200r", frame)
            return []
        kept = self._logs.get(attempt)
        if kept is None:
            return []
        covered = 0
        while covered < len(kept) and kept[covered]["seq"] <= seq:
            covered += 1
        del kept[:covered]
        if not kept:
            del self._logs[attempt]
        return []

    def _on_drain(self, frame: dict[str, Any]) -> list[Output]:
        # The master's drain only stops new work; the agent keeps running (an
        # operator's "drain" button), unlike a SIGTERM.
        self.draining = True
        logger.info("draining: new assignments will be rejected")
        return []

    def _on_resume(self, frame: dict[str, Any]) -> list[Output]:
        if not self.shutting_down:
            self.draining = False
            logger.info("resumed: accepting assignments")
        return []

    def _on_error(self, frame: dict[str, Any]) -> list[Output]:
        logger.warning("master error %s: %s", frame.get("code"), frame.get("message"))
        return []

    # -- process events ------------------------------------------------------

    def process_started(self, attempt: int, pid: int, started_at: float) -> list[Output]:
        a = self._running.get(attempt)
        if a is None:
            return []
        a.started_at = started_at
        return self._emit(
            {"type": "started", "attempt": attempt, "pid": pid, "started_at": started_at}
        )

    def process_failed_to_start(
        self, attempt: int, reason: str, finished_at: float
    ) -> list[Output]:
        a = self._running.get(attempt)
        if a is None:
            return []
        return self._finish(a, "failed", None, reason, finished_at)

    def output(self, attempt: int, stream: str, data: bytes) -> list[Output]:
        """Account for bytes a process printed; returns log frames once a batch is full."""
        a = self._running.get(attempt)
        if a is None or not data or stream not in STREAMS:
            return []
        a.output_bytes += len(data)
        room = max(self.log_limit_bytes - a.kept_bytes, 0)
        if len(data) > room:
            # Past the cap the bytes are counted and dropped; the process keeps running.
            a.truncated = True
            data = data[:room]
            if not data:
                return []
        a.kept_bytes += len(data)
        buf = a.pending[stream]
        buf += data
        out: list[Output] = []
        batch = self._batch_bytes
        while len(buf) >= batch:
            chunk = bytes(buf[:batch])
            del buf[:batch]
            out += self._log(a, stream, chunk)
        return out

    def flush_logs(self) -> list[Output]:
        """Turn every partial batch into a log frame (called every LOG_FLUSH_S)."""
        out: list[Output] = []
        for a in self._running.values():
            for stream in STREAMS:
                if a.pending[stream]:
                    chunk = bytes(a.pending[stream])
                    a.pending[stream].clear()
                    out += self._log(a, stream, chunk)
        return out

    def deadline_passed(self, attempt: int) -> list[Output]:
        a = self._running.get(attempt)
        if a is None:
            return []
        a.kill_reason = a.kill_reason or "timed_out"
        logger.info("attempt %s timed out after %ss", attempt, _seconds(a.timeout))
        return [KillProcess(attempt)]

    def process_exited(self, attempt: int, returncode: int, finished_at: float) -> list[Output]:
        a = self._running.get(attempt)
        if a is None:
            return []
        out: list[Output] = []
        for stream in STREAMS:
            chunk = bytes(a.pending[stream])
            a.pending[stream].clear()
            out += self._log(a, stream, chunk, final=True)
        if a.kill_reason == "timed_out":
            status, reason = "timed_out", f"timed out after {_seconds(a.timeout)}s"
        elif a.kill_reason == "cancelled":
            status, reason = "cancelled", "cancelled"
        elif a.kill_reason == "lost":
            status, reason = "lost", a.lost_reason
        elif returncode == 0:
            status, reason = "succeeded", ""
        elif returncode > 0:
            status, reason = "failed", f"exit code {returncode}"
        else:
            status, reason = "failed", f"killed by signal {-returncode}"
        return out + self._finish(a, status, returncode, reason, finished_at)

    # -- shutdown and self-fencing -----------------------------------------------

    def begin_shutdown(self, drain_timeout: float) -> list[Output]:
        """First SIGTERM/SIGINT: reject new work, tell the master at once, let runs end."""
        if self.shutting_down:
            return []
        self.shutting_down = True
        self.draining = True
        self.drain_timeout = drain_timeout
        logger.info(
            "draining: waiting up to %ss for %d running attempt(s)",
            _seconds(drain_timeout),
            len(self._running),
        )
        return self.heartbeat()

    def drain_expired(self) -> list[Output]:
        """The drain timeout passed: kill what still runs and report it lost."""
        return self._kill_all(
            f"agent shut down: drain timeout of {_seconds(self.drain_timeout)}s passed"
        )

    def shutdown_now(self) -> list[Output]:
        """A second SIGTERM/SIGINT while draining: kill now, do not wait for the timeout."""
        return self._kill_all("agent shut down: killed by a second signal during the drain")

    def check_fence(self) -> list[Output]:
        """Kill everything once the master has been out of reach for fence_after_s.

        The master declares a silent worker lost and retries its attempts elsewhere;
        killing them here means a retry never overlaps a process nobody watches.
        """
        due = self.fence_due
        if due is None or self.clock() < due:
            return []
        reason = f"self-fenced: no contact with the master for {_seconds(self.fence_after_s)}s"
        logger.warning("%s; killing attempts %s", reason, self.running_ids)
        return self._kill_all(reason)

    def _kill_all(self, reason: str) -> list[Output]:
        out: list[Output] = []
        for a in self._running.values():
            # One already being killed for a cancel or a timeout keeps that reason.
            if a.kill_reason is None:
                a.kill_reason, a.lost_reason = "lost", reason
                out.append(KillProcess(a.id))
        return out

    # -- helpers -------------------------------------------------------------

    def _reply(self, frame: dict[str, Any]) -> Send:
        return Send(frame)

    def _reject(self, attempt: int, reason: str) -> Send:
        logger.info("rejected attempt %s: %s", attempt, reason)
        return Send({"type": "rejected", "attempt": attempt, "reason": reason})

    def _emit(self, frame: dict[str, Any]) -> list[Output]:
        if self.online:
            return [Send(frame)]
        self._outbox.append(frame)
        return []

    def _log(self, a: _Attempt, stream: str, chunk: bytes, final: bool = False) -> list[Output]:
        text = a.decoders[stream].decode(chunk, final)
        if not text:
            return []  # only the first bytes of a multibyte character so far
        frame = {"type": "log", "attempt": a.id, "seq": a.next_seq, "stream": stream, "data": text}
        a.next_seq += 1
        self._logs.setdefault(a.id, []).append(frame)
        return [Send(frame)] if self.online else []

    def _finish(
        self, a: _Attempt, status: str, exit_code: int | None, reason: str, finished_at: float
    ) -> list[Output]:
        frame = {
            "type": "finished",
            "attempt": a.id,
            "status": status,
            "exit_code": exit_code,
            "reason": reason,
            "started_at": a.started_at,
            "finished_at": finished_at,
            "output_bytes": a.output_bytes,
            "truncated": a.truncated,
            "last_seq": a.next_seq - 1,
        }
        del self._running[a.id]
        self._unacked[a.id] = frame
        logger.info(
            "finished attempt %s exit %s (%s%s)",
            a.id,
            exit_code,
            status,
            f": {reason}" if reason else "",
        )
        # Spool first: a crash between the two must not lose the only copy.
        out: list[Output] = [WriteSpool(a.id, frame)]
        if self.online:
            out.append(Send(frame))
        return out


def _seconds(value: float | None) -> str:
    return f"{value:g}" if value is not None else "?"


def _assign_problem(frame: dict[str, Any]) -> str | None:
    """What is wrong with an assign frame, or None."""
    argv, shell = frame.get("argv"), frame.get("shell")
    if (argv is None) == (shell is None):
        return "exactly one of argv and shell must be set"
    if argv is not None and (
        not isinstance(argv, list) or not argv or not all(isinstance(x, str) for x in argv)
    ):
        return "argv must be a non-empty list of strings"
    if shell is not None and (not isinstance(shell, str) or not shell.strip()):
        return "shell must be a non-empty string"
    env = frame.get("env")
    if env is not None and (
        not isinstance(env, dict)
        or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
        )
    ):
        return "env must map names to strings"
    cwd = frame.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        return "cwd must be a string or null"
    timeout = frame.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        return "timeout must be a positive number or null"
    return None


# --------------------------------------------------------------------------
# Shell: files


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state_dir / "spool").mkdir(mode=0o700, exist_ok=True)


def load_credential(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / "credential.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("credential"), str):
        raise CredentialError(f"{path} has no credential; remove it and enroll again")
    return data


def save_credential(state_dir: Path, data: dict[str, Any]) -> None:
    ensure_state_dir(state_dir)
    _atomic_write(state_dir / "credential.json", json.dumps(data, indent=2).encode())


def load_spool(state_dir: Path) -> list[dict[str, Any]]:
    frames = []
    spool = state_dir / "spool"
    if not spool.is_dir():
        return []
    for path in sorted(spool.glob("*.json")):
        try:
            frames.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable spool file %s: %s", path, exc)
    return frames


# --------------------------------------------------------------------------
# Shell: registration and reconnect policy


class Backoff:
    """Exponential backoff with jitter: 0.5 s doubling to a 15 s cap."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL_S,
        cap: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial, self.cap, self.rng = initial, cap, rng
        self.failures = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * 2**self.failures)
        self.failures = min(self.failures + 1, 32)
        # +-20% so a master restart is not met by every agent in the same millisecond.
        return min(self.cap, base * (0.8 + 0.4 * self.rng()))

    def reset(self) -> None:
        self.failures = 0


def register(
    server: str,
    token: str,
    *,
    name: str,
    capacity: int,
    labels: Sequence[str],
    state_dir: Path,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Enroll with the master and store the credential; retries while it is unreachable."""
    import requests  # only needed once per node, keeps `--help` fast

    backoff = backoff or Backoff()
    body = {
        "token": token,
        "name": name,
        "hostname": socket.gethostname(),
        "capacity": capacity,
        "labels": list(labels),
    }
    url = server + "/api/workers/register"
    while True:
        try:
            response = requests.post(url, json=body, timeout=30)
        except requests.RequestException as exc:
            delay = backoff.next_delay()
            logger.warning("cannot reach %s (%s); retrying in %.1fs", url, exc, delay)
            sleep(delay)
            continue
        if response.status_code >= 500:
            delay = backoff.next_delay()
            logger.warning(
                "registration failed: HTTP %s; retrying in %.1fs", response.status_code, delay
            )
            sleep(delay)
            continue
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code not in (200, 201):
            message = payload.get("error") if isinstance(payload, dict) else None
            raise RegistrationRefused(message or f"HTTP {response.status_code}")
        try:
            data = {
                "server": server,
                "worker_id": payload["worker"]["id"],
                "name": payload["worker"].get("name", name),
                "credential": payload["credential"],
            }
        except (TypeError, KeyError, AttributeError):
            raise RegistrationRefused(
                "the master's answer has no worker id or credential"
            ) from None
        save_credential(state_dir, data)
        logger.info("registered as worker %s (%s)", data["worker_id"], data["name"])
        return data


def _load_prctl() -> Callable[[int, int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_agent() -> None:
    """Runs in the child before exec: SIGKILL it if the agent dies (Linux).

    A command whose agent was killed -9 would otherwise run on as an orphan
    while the master retries it elsewhere. Its own children are not covered;
    self-fencing and timeouts are the backstop for those.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def websocket_url(server: str) -> str:
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/agent/", "", ""))


# --------------------------------------------------------------------------
# Shell: asyncio


class Socket(Protocol):
    """What the shell needs from a websocket connection (a fake one in tests)."""

    async def send(self, message: str) -> None: ...
    async def close(self) -> None: ...
    def __aiter__(self) -> Any: ...


@dataclass
class _Run:
    """A live process of one attempt, as the shell sees it."""

    attempt: int
    pgid: int | None = None
    kill_requested: bool = False
    escalation: asyncio.TimerHandle | None = None
    deadline: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class AgentConfig:
    server: str
    name: str
    capacity: int = 4
    labels: tuple[str, ...] = ()
    state_dir: Path = Path(".")
    drain_timeout: float = 30.0


def _encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class Agent:
    """The asyncio shell around AgentCore: socket, processes, timers, spool."""

    def __init__(self, config: AgentConfig, credential: str, hostname: str | None = None) -> None:
        self.config = config
        self.credential = credential
        ensure_state_dir(config.state_dir)
        self.spool_dir = config.state_dir / "spool"
        self.core = AgentCore(
            name=config.name,
            hostname=hostname or socket.gethostname(),
            capacity=config.capacity,
            labels=config.labels,
            spooled=load_spool(config.state_dir),
        )
        self.backoff = Backoff()
        self._runs: dict[int, _Run] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._inflight: dict[str, Any] | None = None
        self._ws: Socket | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()  # first SIGTERM/SIGINT: drain
        self._hurry = asyncio.Event()  # second one: kill now
        self._signals = 0
        self._closing = False  # the drain is over: no more reconnects
        # Set whenever core or process state may have changed, so the drain waits on
        # conditions instead of polling them.
        self._changed = asyncio.Event()

    # -- outputs ----------------------------------------------------------

    def dispatch(self, outputs: Iterable[Output]) -> None:
        """Carry out the core's outputs in order; synchronous so frame order is kept."""
        for out in outputs:
            if isinstance(out, Send):
                if self._queue is not None:
                    self._queue.put_nowait(out.frame)
                else:
                    logger.debug("dropping %s frame: no connection", out.frame.get("type"))
            elif isinstance(out, StartProcess):
                self._runs[out.attempt] = _Run(out.attempt)
                task = asyncio.create_task(self._run_process(out))
                self._runners.add(task)
                task.add_done_callback(self._runner_done)
            elif isinstance(out, KillProcess):
                run = self._runs.get(out.attempt)
                if run is not None:
                    run.kill_requested = True
                    self._terminate(run)
            elif isinstance(out, WriteSpool):
                _atomic_write(self.spool_dir / f"{out.attempt}.json", _encode(out.frame).encode())
            elif isinstance(out, RemoveSpool):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spool_dir / f"{out.attempt}.json")
            elif isinstance(out, Welcomed):
                self.backoff.reset()
                logger.info("connected as worker %s (%s)", out.worker_id, self.config.name)
                if self._heartbeat is not None:
                    self._heartbeat.cancel()
                self._heartbeat = asyncio.create_task(self._beat(out.heartbeat_s))
        self._changed.set()

    # -- processes ----------------------------------------------------------

    async def _run_process(self, start: StartProcess) -> None:
        run = self._runs[start.attempt]
        loop = asyncio.get_running_loop()
        # Our own pipes rather than asyncio's PIPE: Process.wait() also waits for the
        # pipes to close, which a grandchild like `sleep 1000 &` would hold open.
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *start.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env={**os.environ, **start.env},
                cwd=start.cwd,
                start_new_session=True,  # its own process group, killed as one
                preexec_fn=_die_with_agent,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in argv or env
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            where = getattr(exc, "filename", None)
            where = start.argv[0] if where is None else where
            reason = f"cannot start: {getattr(exc, 'strerror', None) or exc} ({where})"
            self._runs.pop(start.attempt, None)
            self.dispatch(self.core.process_failed_to_start(start.attempt, reason, time.time()))
            return
        os.close(out_w)
        os.close(err_w)
        run.pgid = proc.pid
        self.dispatch(self.core.process_started(start.attempt, proc.pid, time.time()))
        readers = [
            self._read_pipe(out_r, start.attempt, "stdout"),
            self._read_pipe(err_r, start.attempt, "stderr"),
        ]
        if run.kill_requested:  # cancelled while spawning
            self._terminate(run)
        elif start.timeout is not None:
            run.deadline = loop.call_later(
                start.timeout, lambda: self.dispatch(self.core.deadline_passed(start.attempt))
            )
        try:
            returncode = await proc.wait()
            if run.deadline is not None:
                run.deadline.cancel()
            # The attempt ends with its leader; leftovers of the group go too, and
            # their end closes the pipes.
            self._terminate(run)
            await asyncio.gather(*readers)
        finally:
            self._runs.pop(start.attempt, None)
        self.dispatch(self.core.process_exited(start.attempt, returncode, time.time()))

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        self._runners.discard(task)
        self._changed.set()

    def _read_pipe(self, fd: int, attempt: int, stream: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self.dispatch(self.core.output(attempt, stream, data))
                if self._flush_handle is None and self.core.has_pending_logs:
                    self._flush_handle = loop.call_later(LOG_FLUSH_S, self._flush_logs)
                return
            loop.remove_reader(fd)
            os.close(fd)
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        return done

    def _flush_logs(self) -> None:
        self._flush_handle = None
        self.dispatch(self.core.flush_logs())

    def _terminate(self, run: _Run) -> None:
        """SIGTERM the group now, SIGKILL it after KILL_GRACE_S (once per run)."""
        if run.pgid is None or run.escalation is not None:
            return
        if not _killpg(run.pgid, signal.SIGTERM):
            return  # nobody left in the group
        run.escalation = asyncio.get_running_loop().call_later(
            KILL_GRACE_S, _killpg, run.pgid, signal.SIGKILL
        )

    # -- socket ---------------------------------------------------------------

    async def serve(self, ws: Socket) -> None:
        """Speak the protocol over one open connection until it closes."""
        self._ws = ws
        self._queue = queue = asyncio.Queue()
        self.dispatch(self.core.connection_opened())
        sender = asyncio.create_task(self._send_loop(ws, queue))
        receiver = asyncio.create_task(self._receive_loop(ws))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver, self._heartbeat):
                if task is not None:
                    task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            self._heartbeat = None
            unsent = [self._inflight] if self._inflight is not None else []
            while not queue.empty():
                unsent.append(queue.get_nowait())
            self._inflight = None
            self._queue = None
            self._ws = None
            self.core.connection_lost(unsent)
            self._changed.set()
            code = getattr(ws, "close_code", None)
            level = logging.INFO if self._closing else logging.WARNING
            logger.log(level, "disconnected from master (close code %s)", code)

    async def _send_loop(self, ws: Socket, queue: asyncio.Queue[dict[str, Any]]) -> None:
        from websockets.exceptions import ConnectionClosed

        while True:
            frame = await queue.get()
            self._inflight = frame
            try:
                await ws.send(_encode(frame))
            except ConnectionClosed:
                return
            self._inflight = None
            queue.task_done()

    async def _receive_loop(self, ws: Socket) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, bytes):
                    logger.warning("ignoring a binary frame from master")
                    continue
                self.dispatch(self.core.receive(message))

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.dispatch(self.core.heartbeat())

    async def connection_loop(self) -> int:
        """Connect, serve, reconnect with backoff; returns 3 if the credential is refused."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        url = websocket_url(self.config.server)
        while True:
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.credential}"},
                    max_size=MAX_FRAME_BYTES,
                    ping_interval=PING_INTERVAL_S,
                    ping_timeout=PING_TIMEOUT_S,
                    user_agent_header=f"scheduler-agent/{AGENT_VERSION}",
                ) as ws:
                    logger.info("connected to %s", url)
                    await self.serve(ws)
                if ws.close_code in (CLOSE_REVOKED, CLOSE_REPLACED):
                    # Revoked while connected, or another process connected with
                    # our credential (a copied state dir): reconnecting would only
                    # fight it, and two agents must never share one worker.
                    logger.error(
                        "master closed the connection (%s): %s; remove %s and enroll again",
                        ws.close_code,
                        "credential revoked"
                        if ws.close_code == CLOSE_REVOKED
                        else "another agent connected with this credential",
                        self.config.state_dir / "credential.json",
                    )
                    return 3
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    logger.error(
                        "credential refused by master; remove %s and enroll again",
                        self.config.state_dir / "credential.json",
                    )
                    return 3
                logger.warning("master rejected the connection: HTTP %s", status)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any network failure means: try again later
                logger.warning("cannot connect to %s: %s", url, exc or type(exc).__name__)
            # While draining it keeps reconnecting so results can still be delivered;
            # only the end of the drain stops it.
            if self._closing:
                return 0
            delay = self.backoff.next_delay()
            logger.info("reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _fence_watch(self) -> None:
        """Run the core's self-fence check when it is due, across reconnect attempts."""
        while True:
            due = self.core.fence_due
            delay = FENCE_POLL_S
            if due is not None:
                delay = min(delay, max(0.0, due - self.core.clock()))
            await asyncio.sleep(delay)
            self.dispatch(self.core.check_fence())

    # -- lifecycle --------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: the first drains, the second kills now, a third SIGKILLs."""
        self._signals += 1
        if self._signals == 1:
            self.dispatch(self.core.begin_shutdown(self.config.drain_timeout))
            self._stop.set()
        elif self._signals == 2:
            logger.warning("stopped again: killing running attempts now")
            self.dispatch(self.core.shutdown_now())
            self._hurry.set()
        else:
            # The operator insists: no grace for processes that ignore SIGTERM.
            for run in self._runs.values():
                if run.pgid is not None:
                    _killpg(run.pgid, signal.SIGKILL)
        self._changed.set()

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM and the drain (exit 0) or the master refuses us (exit 3)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        conn = asyncio.create_task(self.connection_loop())
        fence = asyncio.create_task(self._fence_watch())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({conn, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not self._stop.is_set():
                return conn.result()
            await self.drain()
            return 0
        finally:
            for task in (conn, fence, stop):
                task.cancel()
            await asyncio.gather(conn, fence, stop, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for run in list(self._runs.values()):
                if run.pgid is not None:
                    _killpg(run.pgid, signal.SIGKILL)

    async def drain(self) -> None:
        """After request_stop(): let runs end, have results acked, then close the socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        if not await self._wait_for(lambda: self.core.drained, deadline):
            killed: list[Output] = []
            if not self._hurry.is_set():
                logger.warning(
                    "drain timeout of %ss passed; still running: %s",
                    _seconds(self.config.drain_timeout),
                    self.core.running_ids,
                )
                killed = self.core.drain_expired()
                self.dispatch(killed)
            # SIGKILL follows SIGTERM after KILL_GRACE_S, so the exits are bounded; even
            # after a second signal, their results are worth reporting.
            await self._wait_for(
                lambda: not self._runners, loop.time() + KILL_GRACE_S + 1.0, hurry_stops=False
            )
            # Only results produced by the kill are worth the extra wait; older ones
            # already had the whole drain to be acknowledged.
            if killed and not self._hurry.is_set():
                await self._wait_for(lambda: self.core.drained, loop.time() + DRAIN_ACK_WAIT_S)
        self._closing = True
        queue, ws = self._queue, self._ws
        if queue is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.join(), SEND_FLUSH_S)
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), SEND_FLUSH_S)
        if not self.core.drained:
            logger.info(
                "exiting with unacknowledged results %s; they are replayed on the next start",
                self.core.unacked_ids,
            )

    async def _wait_for(
        self, condition: Callable[[], bool], deadline: float, *, hurry_stops: bool = True
    ) -> bool:
        """Wait until condition() holds (True), the deadline passes or a second signal."""
        loop = asyncio.get_running_loop()
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0 or (hurry_stops and self._hurry.is_set()):
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pgid was recycled by someone else's process: ours is gone.
        return False
    return True


# --------------------------------------------------------------------------
# CLI


def _server(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{value!r}: the server URL takes no query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} has an invalid port") from None
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _capacity(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 1024:
        raise argparse.ArgumentTypeError(f"{number} is not between 1 and 1024")
    return number


def _labels(value: str) -> tuple[str, ...]:
    labels = tuple(item.strip() for item in value.split(",") if item.strip())
    for label in labels:
        if not LABEL_RE.fullmatch(label):
            raise argparse.ArgumentTypeError(
                f"invalid label {label!r}: use 1-64 of A-Z a-z 0-9 _ . -"
            )
    return labels


def _name(value: str) -> str:
    if not value.strip() or len(value) > 200:
        raise argparse.ArgumentTypeError("the name must be 1-200 characters")
    return value.strip()


def _seconds_arg(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 or more seconds")
    return number


def build_parser() -> argparse.ArgumentParser:
    default_state = os.environ.get("SCHEDULER_AGENT_STATE_DIR") or "~/.local/state/scheduler-agent"
    parser = argparse.ArgumentParser(
        prog="scheduler-agent", description="Run the scheduler master's tasks on this node."
    )
    parser.add_argument(
        "--server", required=True, type=_server, help="master URL, http(s)://HOST:PORT"
    )
    parser.add_argument("--token", help="enrollment token (only needed the first time)")
    parser.add_argument("--name", type=_name, default=None, help="worker name (default: hostname)")
    parser.add_argument("--capacity", type=_capacity, default=4, help="parallel slots, 1-1024")
    parser.add_argument(
        "--labels", type=_labels, default=(), help="comma separated, e.g. gpu,linux"
    )
    parser.add_argument("--state-dir", default=default_state, help=f"default: {default_state}")
    parser.add_argument(
        "--drain-timeout",
        type=_seconds_arg,
        default=30.0,
        help="seconds to let running attempts finish after SIGTERM/SIGINT before killing"
        " them (default 30)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {AGENT_VERSION}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    state_dir = Path(args.state_dir).expanduser()
    name = args.name or socket.gethostname()
    try:
        stored = load_credential(state_dir)
    except CredentialError as exc:
        parser.error(str(exc))
    if stored is None:
        if not args.token:
            parser.error(f"--token is required to enroll (no credential in {state_dir})")
        try:
            stored = register(
                args.server,
                args.token,
                name=name,
                capacity=args.capacity,
                labels=args.labels,
                state_dir=state_dir,
            )
        except RegistrationRefused as exc:
            print(f"registration refused: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    elif stored.get("server") and stored["server"] != args.server:
        logger.warning("credential in %s was issued by %s", state_dir, stored["server"])
    config = AgentConfig(
        server=args.server,
        name=name,
        capacity=args.capacity,
        labels=args.labels,
        state_dir=state_dir,
        drain_timeout=args.drain_timeout,
    )

    async def _main() -> int:
        return await Agent(config, stored["credential"]).run()

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
