"""scheduler-agent: runs the master's assignments as real processes on this node.

A single file on purpose: the master serves it for download, so it may only
use the stdlib, `websockets` and `requests`, and never imports Django or the
project.

Two layers, as in python-websockets:

- AgentCore is the protocol with no I/O. It takes frames and events (a
  process started, printed bytes, exited) and returns outputs: frames to send
  (Send) and actions for the shell (StartProcess, KillProcess, WriteSpool,
  RemoveSpool, Welcomed, FetchShardOutputs). Unit tests drive it with exact
  frames.
- Agent is the asyncio shell: the websocket, process groups, pipes, timers
  and the spool file. It decides nothing the core can decide. Its cost per
  command is a fraction of a millisecond: spawned with vfork, no thread or task
  per process (a pidfd and two pipes in the event loop), frames batched into
  one message with protocol 2, one append to the spool per result.

SIGTERM/SIGINT drains: new assigns are rejected and running commands get
--drain-timeout seconds to finish before they are killed and reported lost; a
second signal kills at once. With no master for the welcome's fence_after_s,
running commands are killed (self-fencing) so a retry elsewhere never overlaps
them. If the agent itself dies, even by SIGKILL, a small watchdog process it
started kills every command's process group (see Watchdog).

Several servers of one install (`serve` processes sharing PostgreSQL and
Redis): give --server more than once or as a comma-separated list. The agent
connects to the first and, when it fails twice in a row, moves on to the next,
round-robin (ServerRotation); enrollment does the same. HTTP to the master (a
merge's inputs) goes to the server it is connected to. While work is at stake,
reconnect attempts come at least every tenth of the fence (reconnect_cap), so a
master restarted within the fence finds its commands still running.

Usage: SCHEDULER_ENROLLMENT_TOKEN=TOKEN scheduler-agent --server https://HOST [--server ...]
       [--capacity 4] [--ca-file CA.pem]

The enrollment token is read from --token-file or SCHEDULER_ENROLLMENT_TOKEN,
so that it never shows in `ps` (--token works too, but there it does). TLS is
verified against the system's CAs, or --ca-file's for a private CA.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

AGENT_VERSION = "0.2.0"

# --- wire vocabulary: a verbatim copy of scheduler_site/wire.py (`make wire`) ---
# The agent protocol's vocabulary: its one definition.
#
# The master imports it (workers_app.protocol, tasks_app.validators). The
# agent must stay a single standard-library file, so workers_app/agent.py
# carries a verbatim copy of this file between its "wire vocabulary" markers:
# `make wire` writes the copy, and tests/test_protocol.py fails when the two
# differ. Keep this file free of imports and of anything but the vocabulary.

# 1: one JSON object per websocket message.
# 2: a message may also be a JSON array of frames, handled in order; the side
#    that sends them batches whatever is ready, the other applies them together.
PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOLS = (1, 2)

# Largest websocket message by default; the master's own limit is in its welcome.
MAX_FRAME_BYTES = 1024 * 1024
# Most frames one message may carry; a receiver refuses more.
MAX_FRAMES_PER_MESSAGE = 1000
# Largest `data` of one log frame, in characters.
MAX_LOG_DATA = 512 * 1024
MIN_CAPACITY, MAX_CAPACITY = 1, 1024
# A label, as a worker carries it and a task requires it.
LABEL_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
MAX_LABELS = 32
STREAMS = ("stdout", "stderr")
# "lost": the agent gave the attempt up (drain timeout, self-fencing); it is retried.
RESULT_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "lost")

# Close codes in the private range (RFC 6455 section 7.4.2: 4000-4999).
CLOSE_BAD_CREDENTIAL = 4401
CLOSE_REVOKED = 4403
# Silent for longer than the lost timeout while the socket stayed open.
CLOSE_SILENT = 4408
# A newer connection of the same worker said hello: only one may serve it.
CLOSE_REPLACED = 4409
# RFC 6455 7.4.1: 1013 "try again later", a transient failure of the master.
CLOSE_TRY_AGAIN = 1013

# Largest magnitude of a number in a frame: the largest float. Python's JSON
# parser also takes NaN, infinities and integers of any size, which neither
# side can compute with (NaN fails the comparison too). Each side's own ranges
# are checked after this.
MAX_NUMBER = 1.7976931348623157e308

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_LIST = (list,)
_NONE = (type(None),)

# Frames by type: {field: (allowed JSON types, required)}. A bool never counts
# as a number, even though Python says it is one.
AGENT_FRAMES = {
    "hello": {
        "protocol": (_INT, True),
        "agent_version": (_STR, False),
        "hostname": (_STR, False),
        "name": (_STR, False),
        "capacity": (_INT, True),
        "labels": (_LIST, False),
        "running": (_LIST, True),
        # Finished while disconnected, result spooled and about to be replayed.
        "spooled": (_LIST, False),
        "draining": (_BOOL, False),
    },
    "accepted": {"attempt": (_INT, True)},
    "rejected": {"attempt": (_INT, True), "reason": (_STR, False)},
    "started": {
        "attempt": (_INT, True),
        "pid": (_INT + _NONE, False),
        "started_at": (_NUM, False),
    },
    "log": {
        "attempt": (_INT, True),
        "seq": (_INT, True),
        "stream": (_STR, True),
        "data": (_STR, True),
    },
    "finished": {
        "attempt": (_INT, True),
        "status": (_STR, True),
        "exit_code": (_INT + _NONE, True),
        "reason": (_STR, False),
        "started_at": (_NUM + _NONE, False),
        "finished_at": (_NUM + _NONE, False),
        "output_bytes": (_INT, False),
        "truncated": (_BOOL, False),
        "last_seq": (_INT, False),
    },
    "heartbeat": {"running": (_LIST, False), "draining": (_BOOL, False)},
}

MASTER_FRAMES = {
    "welcome": {
        "protocol": (_INT, True),
        "worker_id": (_INT, True),
        "name": (_STR, True),
        "heartbeat_s": (_NUM, True),
        "log_limit_bytes": (_INT, True),
        "max_frame_bytes": (_INT, True),
        "lost_after_s": (_NUM, True),
        "fence_after_s": (_NUM + _NONE, True),
    },
    "assign": {
        "attempt": (_INT, True),
        "run": (_INT, True),
        "task_name": (_STR, True),
        "argv": (_LIST + _NONE, True),
        "shell": (_STR + _NONE, True),
        "env": ((dict,), True),
        # Variables the command gets after env, whose values the agent masks
        # (***) in the output it sends. An agent that predates them runs the
        # command without them: upgrade agents before giving tasks secrets.
        "secret_env": ((dict,), False),
        "cwd": (_STR + _NONE, True),
        "timeout": (_NUM + _NONE, True),
        "shard_index": (_INT, True),
        "shard_count": (_INT, True),
        # A merge (fan-in) attempt: argv and shell are both null, so an agent
        # that predates merges refuses it ("exactly one of argv and shell")
        # instead of running the command without its inputs. The command is
        # here ({"argv", "shell"}, one of them set), with "outputs": the path
        # (on the master) whose GET streams every shard's stdout in shard
        # order, each framed as a line "<index> <byte length>" and its bytes.
        "merge": ((dict,) + _NONE, False),
    },
    "cancel": {"attempt": (_INT, True)},
    # The result of this attempt is stored: the agent may forget it.
    "ack": {"attempt": (_INT, True)},
    # Output of this attempt up to seq is stored.
    "log_ack": {"attempt": (_INT, True), "seq": (_INT, True)},
    "drain": {},
    "resume": {},
    "error": {"code": (_STR, True), "message": (_STR, True), "attempt": (_INT, False)},
}


def field_problem(frame, schemas):
    """(code, message) for what is wrong with a decoded frame's type and fields, or None."""
    if not isinstance(frame, dict):
        return "malformed", "frame must be a JSON object"
    kind = frame.get("type")
    # A list or object as the type is unhashable: `in` would raise TypeError.
    if not isinstance(kind, str) or kind not in schemas:
        return "unknown_type", f"unknown frame type {kind!r}"
    for name, (types, required) in schemas[kind].items():
        if name not in frame:
            if required:
                return "malformed", f"{kind}: missing field {name!r}"
            continue
        value = frame[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return "malformed", f"{kind}: field {name!r} has the wrong type"
        if isinstance(value, (int, float)) and not -MAX_NUMBER <= value <= MAX_NUMBER:
            return "malformed", f"{kind}: field {name!r} is not a finite number"
    if not valid_text(frame):
        return "malformed", f"{kind}: text is not valid Unicode"
    return None


def valid_text(value):
    """False if a string anywhere in value holds a lone surrogate: JSON escapes
    let one in, and no database, file or socket takes it as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
    return True


def pack(texts, protocol, max_bytes):
    """The websocket messages that carry these encoded frames, in order, each
    with its frame count. Protocol 1: one frame per message. Protocol 2: JSON
    arrays of at most max_bytes (UTF-8) and MAX_FRAMES_PER_MESSAGE frames; a
    frame bigger than max_bytes still goes, alone, for the receiver to refuse."""
    if protocol < 2:
        return [(text, 1) for text in texts]
    messages, batch, size = [], [], 1  # "[" and "]", and a "," before all but the first
    for text in texts:
        length = len(text) if text.isascii() else len(text.encode())
        if batch and (size + length + 1 > max_bytes or len(batch) >= MAX_FRAMES_PER_MESSAGE):
            messages.append((_array(batch), len(batch)))
            batch, size = [], 1
        batch.append(text)
        size += length + 1
    if batch:
        messages.append((_array(batch), len(batch)))
    return messages


def _array(texts):
    return texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]"


# --- end of wire vocabulary ---

# Defaults until the master's welcome says otherwise.
DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_LOG_LIMIT_BYTES = 4 * 1024 * 1024

READ_BYTES = 64 * 1024  # one os.read per wake-up; small reads cost a syscall per line
LOG_BATCH_BYTES = 64 * 1024
LOG_FLUSH_S = 0.1
# SIGTERM -> SIGKILL grace for cancel, timeout and shutdown. Read at call time so
# tests can lower it.
KILL_GRACE_S = 5.0
# The websocket's own keepalive: a half-open connection (a partition without a
# FIN) is noticed within PING_INTERVAL_S + PING_TIMEOUT_S, so that self-fencing
# starts counting soon after the master stops hearing us.
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
# How long a shutdown waits for queued frames to leave before closing the socket.
SEND_FLUSH_S = 3.0
# After a drain timeout killed what was still running: how long to wait for the
# master to acknowledge those results (the spool replays them on the next start).
DRAIN_ACK_WAIT_S = 5.0
# Upper bound between two self-fence checks while no deadline is known.
FENCE_POLL_S = 1.0

# Longest wait for a connection and its handshake (websockets' default).
OPEN_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_CAP_S = 15.0
# While attempts run or results wait for an ack, at least this many reconnect
# attempts fit in the self-fence (see reconnect_cap).
FENCE_ATTEMPTS = 10
# With several --server URLs, a server is given up for the next one after this
# many failed connections to it in a row (see ServerRotation).
SWITCH_AFTER_FAILURES = 2

LABEL_RE = re.compile(LABEL_PATTERN)

# What a command inherits of the agent's own environment, besides the task's
# variables and the scheduler's: PATH and these (and LC_*), nothing else, so
# that a credential in the agent's or its parent's environment (the master's
# SECRET_KEY under `make run`) never reaches a task. --pass-env adds names.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR", "TERM")
PASSED_ENV_PREFIXES = ("LC_",)
# Secret values in output become this; shorter values are not masked (see
# tasks_app/secret_env.py, the master's side of the same rule).
SECRET_MASK = "***"
MIN_MASKED_LENGTH = 3

# In <state dir>/spool/: finished results until the master acknowledges them.
SPOOL_FILE = "results.jsonl"

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
    env: dict[str, str]  # overlay on top of the agent's passed environment (command_environ)
    cwd: str | None
    timeout: float | None
    stdin: str | None = None  # a file to read as its standard input (a merge's)


@dataclass(frozen=True)
class FetchShardOutputs:
    """Before a merge starts: download each shard's stdout from the master
    (GET <path><i> for i in 0..count-1), then tell the core how it went."""

    attempt: int
    path: str
    count: int


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


Output = Send | StartProcess | KillProcess | WriteSpool | RemoveSpool | Welcomed | FetchShardOutputs


# --------------------------------------------------------------------------
# Protocol core (no I/O)


@dataclass
class _Attempt:
    id: int
    timeout: float | None
    task_name: str = ""
    started_at: float | None = None
    kill_reason: str | None = None  # "cancelled" | "timed_out" | "lost"
    lost_reason: str = ""  # why a "lost" kill happened (drain timeout, self-fence)
    next_seq: int = 0
    output_bytes: int = 0  # produced by the process
    kept_bytes: int = 0  # counted against the log limit (sent or queued)
    truncated: bool = False
    # A merge waiting for its inputs: the process to start once they are here.
    waiting_start: StartProcess | None = None
    pending: dict[str, bytearray] = field(default_factory=lambda: {s: bytearray() for s in STREAMS})
    # Per stream, when the attempt has secrets to mask in its output.
    maskers: dict[str, Masker] | None = None
    decoders: dict[str, codecs.IncrementalDecoder] = field(
        default_factory=lambda: {
            s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS
        }
    )


class Masker:
    """Replaces secret values in a stream of text with ***, also when a value is
    split between two pieces.

    The result is what masking the whole stream at once would give: at each
    position, from the left, the longest value that starts there is masked
    (a regex of the values, longest first). A piece's matches are final up to
    the first position the scan reaches (one not inside a match) from which
    the rest of the piece is a proper prefix of a value: there the next piece
    may complete a value, or a longer one, so the text from there is held
    back. Held back is thus always shorter than the longest value, and never
    the end of a value already masked (`s3cr3ts` ends with what begins it).

    At the end of the stream a held-back end of MIN_MASKED_LENGTH characters
    or more goes out as *** too: the start of a value, where output was cut
    (the log cap, a killed command), is still secret material. A shorter one
    goes out as it is, like a value that short: masking a trailing "s" or "hu"
    would garble output and hide next to nothing.
    """

    def __init__(self, values: Iterable[str]) -> None:
        # Longest first: a value that contains another is masked whole.
        self.values = sorted(
            {v for v in values if len(v) >= MIN_MASKED_LENGTH}, key=len, reverse=True
        )
        self._pattern = re.compile("|".join(re.escape(v) for v in self.values))
        self._firsts = {v[0] for v in self.values}
        self._longest = len(self.values[0]) if self.values else 0
        self.carry = ""

    def __bool__(self) -> bool:
        return bool(self.values)

    def feed(self, text: str, final: bool = False) -> str:
        if not self.values:
            return text  # (an empty pattern would match between every character)
        text = self.carry + text
        held = self._open_ends(text)
        cut = next(held, len(text))
        out: list[str] = []
        pos = 0  # the text before pos is settled
        for match in self._pattern.finditer(text):
            if match.start() >= cut:
                break  # the next piece may still make this match a longer value
            out += (text[pos : match.start()], SECRET_MASK)
            pos = match.end()
            while cut < pos:  # inside a value masked whole: not a start
                cut = next(held, len(text))
        out.append(text[pos:cut])
        tail = text[cut:]
        if final:
            self.carry = ""
            out.append(SECRET_MASK if len(tail) >= MIN_MASKED_LENGTH else tail)
        else:
            self.carry = tail
        return "".join(out)

    def _open_ends(self, text: str) -> Iterator[int]:
        """In order, the positions among the last longest-1 characters from
        which the rest of text is a proper prefix of a value."""
        for i in range(max(len(text) - self._longest + 1, 0), len(text)):
            if text[i] in self._firsts:
                rest = text[i:]
                if any(len(v) > len(rest) and v.startswith(rest) for v in self.values):
                    yield i


def command_environ(environ: dict[bytes, bytes], passed: Iterable[str] = ()) -> dict[bytes, bytes]:
    """The part of the agent's environment its commands inherit: PASSED_ENV,
    LC_* and the names given with --pass-env."""
    names = {os.fsencode(n) for n in (*PASSED_ENV, *passed)}
    prefixes = tuple(os.fsencode(p) for p in PASSED_ENV_PREFIXES)
    return {k: v for k, v in environ.items() if k in names or k.startswith(prefixes)}


def _loggable(frame: Any) -> Any:
    """frame as it may be logged: the values of an assign's secret_env masked,
    its names kept (also in a frame nested in an array, as a master bug may send)."""
    if isinstance(frame, list):
        return [_loggable(f) for f in frame]
    if not isinstance(frame, dict) or "secret_env" not in frame:
        return frame
    secrets = frame["secret_env"]
    # (Not a dict, it is malformed, but may still hold the values.)
    hidden = dict.fromkeys(secrets, SECRET_MASK) if isinstance(secrets, dict) else SECRET_MASK
    return {**frame, "secret_env": hidden}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reconnect_cap(fence_after_s: float | None, busy: bool, cap: float = BACKOFF_CAP_S) -> float:
    """The longest wait between two reconnect attempts.

    While attempts run or results wait for an ack (`busy`), a tenth of the
    self-fence: a master back before the fence expires (a restart, an upgrade)
    finds the agent back well before it kills anything, where one wait of the
    normal cap could outlast what is left of the fence. Idle, or without a
    fence, nothing is at stake and the normal cap spares the master a crowd of
    reconnects.
    """
    if not busy or fence_after_s is None:
        return cap
    return min(cap, fence_after_s / FENCE_ATTEMPTS)


class AgentCore:
    """The agent's side of the protocol as a state machine without I/O."""

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
        # What the welcome settled: 2 lets the shell send arrays of frames. Until
        # then one frame per message, which every master reads.
        self.protocol = 1
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
    def backoff_cap(self) -> float:
        """The longest wait before the next reconnect attempt, by reconnect_cap()."""
        return reconnect_cap(self.fence_after_s, busy=not self.drained)

    @property
    def has_pending_logs(self) -> bool:
        return any(buf for a in self._running.values() for buf in a.pending.values())

    @property
    def _batch_bytes(self) -> int:
        # JSON escaping can grow text up to 6x (\u0000); stay well inside the frame limit.
        return max(1024, min(LOG_BATCH_BYTES, MAX_LOG_DATA, self.max_frame_bytes // 8))

    # -- connection events ----------------------------------------------

    def connection_opened(self) -> list[Output]:
        self.connected = True
        self.online = False
        self.protocol = 1  # the hello goes alone, before any welcome
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
        """Handle one message from the master: a frame, or (protocol 2) an array of frames.

        Malformed input is logged, never raised: a master bug must not take the
        node's running processes down with it.
        """
        try:
            decoded = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            logger.warning("ignoring malformed message from master: %s", exc)
            return []
        if not isinstance(decoded, list):
            return self._handle(decoded)
        # Accepted even before the welcome says protocol 2: the welcome itself may
        # arrive in an array with the cancels the master reconciled.
        out: list[Output] = []
        for frame in decoded:
            out += self._handle(frame)
        return out

    def _handle(self, frame: Any) -> list[Output]:
        problem = field_problem(frame, MASTER_FRAMES)
        if problem is not None:
            return self._on_invalid(frame, problem[1])
        try:
            return getattr(self, "_on_" + frame["type"])(frame)
        except Exception as exc:
            # The schema checks types and ranges; this is the net for what it cannot say.
            logger.warning(
                "ignoring malformed %s frame (%s): %.200r", frame["type"], exc, _loggable(frame)
            )
            return []

    def _on_invalid(self, frame: Any, problem: str) -> list[Output]:
        if isinstance(frame, dict) and frame.get("type") == "assign":
            attempt = frame.get("attempt")
            if _is_int(attempt):
                # Answered, so the master does not wait for an accept that never comes.
                return self._on_bad_assign(attempt, problem.removeprefix("assign: "))
        logger.warning("ignoring frame from master (%s): %.200r", problem, _loggable(frame))
        return []

    def _on_welcome(self, frame: dict[str, Any]) -> list[Output]:
        # Types are checked; values out of range keep what we had.
        self.worker_id = frame["worker_id"]
        if frame["protocol"] in SUPPORTED_PROTOCOLS:
            self.protocol = frame["protocol"]
        else:
            logger.warning("unknown protocol %s in welcome; using 1", frame["protocol"])
            self.protocol = 1
        if frame["heartbeat_s"] > 0:
            self.heartbeat_s = float(frame["heartbeat_s"])
        if frame["log_limit_bytes"] >= 0:
            self.log_limit_bytes = frame["log_limit_bytes"]
        if frame["max_frame_bytes"] > 0:
            self.max_frame_bytes = frame["max_frame_bytes"]
        fence = frame["fence_after_s"]
        if fence is not None and fence <= 0:
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
        attempt = frame["attempt"]
        problem = _assign_problem(frame)
        if problem:
            return self._on_bad_assign(attempt, problem)
        repeated = self._repeated_assign(attempt)
        if repeated is not None:
            return repeated
        if self.draining:
            return [self._reject(attempt, "agent is draining")]
        if len(self._running) >= self.capacity:
            return [self._reject(attempt, f"agent at capacity ({self.capacity} running)")]
        command = frame.get("merge") or frame
        argv = (
            list(command["argv"])
            if command["argv"] is not None
            else ["/bin/sh", "-c", command["shell"]]
        )
        env = dict(frame["env"])
        secrets = frame.get("secret_env") or {}
        # Secrets after the task's env (the master refuses a name in both), the
        # scheduler's own variables last, as before.
        env.update(secrets)
        env.update(
            SCHEDULER_RUN_ID=str(frame["run"]),
            SCHEDULER_ATTEMPT_ID=str(attempt),
            SCHEDULER_TASK_NAME=frame["task_name"],
            SCHEDULER_SHARD_INDEX=str(frame["shard_index"]),
            SCHEDULER_SHARD_COUNT=str(frame["shard_count"]),
        )
        timeout = frame["timeout"]
        a = _Attempt(attempt, timeout, frame["task_name"] or "?")
        if Masker(secrets.values()):
            a.maskers = {stream: Masker(secrets.values()) for stream in STREAMS}
        self._running[attempt] = a
        # One INFO line per attempt, when it ends: a line costs the agent about
        # 50 us, as much as the rest of its work on a short command.
        logger.debug("assigned attempt %s (%s)", attempt, frame["task_name"] or "?")
        start = StartProcess(attempt, argv, env, frame["cwd"], timeout)
        if frame.get("merge") is None:
            return [Send({"type": "accepted", "attempt": attempt}), start]
        # A merge: its inputs first (the shell downloads them, then calls
        # shard_outputs_fetched or shard_outputs_failed).
        a.waiting_start = start
        return [
            Send({"type": "accepted", "attempt": attempt}),
            FetchShardOutputs(attempt, frame["merge"]["outputs"], frame["shard_count"]),
        ]

    def _on_bad_assign(self, attempt: int, problem: str) -> list[Output]:
        repeated = self._repeated_assign(attempt)
        if repeated is not None:
            # Rejecting an attempt that runs (or ran) here would let the master
            # queue it again while it is still ours.
            return repeated
        return [self._reject(attempt, f"invalid assign: {problem}")]

    def _repeated_assign(self, attempt: int) -> list[Output] | None:
        """The answer to an assign of an attempt we already have, or None."""
        if attempt in self._running:
            return []  # the master repeated itself; the first assign is in force
        if attempt in self._unacked:
            # Already ran here; the master has not stored the result yet.
            return [Send(self._unacked[attempt])]
        return None

    def _on_cancel(self, frame: dict[str, Any]) -> list[Output]:
        # Keyed by what runs here, not by what the master last assigned: after a
        # reconnect the master may have re-queued the attempt, and the process still
        # has to stop. An attempt that already finished (or never ran) has nothing to kill.
        a = self._running.get(frame["attempt"])
        if a is None:
            return []
        a.kill_reason = a.kill_reason or "cancelled"
        logger.info("cancelling attempt %s", a.id)
        return [KillProcess(a.id)]

    def _on_ack(self, frame: dict[str, Any]) -> list[Output]:
        attempt = frame["attempt"]
        if attempt not in self._unacked:
            return []
        del self._unacked[attempt]
        # The master stored the result, so it has every log frame up to last_seq.
        self._logs.pop(attempt, None)
        return [RemoveSpool(attempt)]

    def _on_log_ack(self, frame: dict[str, Any]) -> list[Output]:
        attempt, seq = frame["attempt"], frame["seq"]
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
        logger.warning("master error %s: %s", frame["code"], frame["message"])
        return []

    # -- process events ------------------------------------------------------

    def shard_outputs_fetched(
        self, attempt: int, directory: str, stdin: str, now: float
    ) -> list[Output]:
        """A merge's inputs are on disk: start it, unless it was killed meanwhile
        (a cancel while it waited has no process to kill, so it is answered here)."""
        a = self._running.get(attempt)
        if a is None or a.waiting_start is None:
            return []
        start, a.waiting_start = a.waiting_start, None
        if a.kill_reason is not None:
            return self._finish_unstarted(a, now)
        env = dict(start.env, SCHEDULER_SHARD_OUTPUTS=directory)
        return [StartProcess(attempt, start.argv, env, start.cwd, start.timeout, stdin)]

    def shard_outputs_failed(self, attempt: int, reason: str, finished_at: float) -> list[Output]:
        """A merge's inputs could not be fetched: it fails (and is retried per policy)."""
        a = self._running.get(attempt)
        if a is None or a.waiting_start is None:
            return []
        a.waiting_start = None
        if a.kill_reason is not None:
            return self._finish_unstarted(a, finished_at)
        return self._finish(a, "failed", None, f"cannot fetch shard outputs: {reason}", finished_at)

    def _finish_unstarted(self, a: _Attempt, now: float) -> list[Output]:
        """Cancelled (or given up: drain, fence) while it waited for its inputs."""
        if a.kill_reason == "lost":
            return self._finish(a, "lost", None, a.lost_reason, now)
        return self._finish(a, "cancelled", None, "cancelled", now)

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
        if a.maskers is not None:
            # Before the output leaves this node: the master and its database
            # never see a secret the command printed.
            text = a.maskers[stream].feed(text, final)
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
            "finished attempt %s (%s) exit %s (%s%s)",
            a.id,
            a.task_name,
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
    """What is wrong with an assign frame beyond its field types, or None."""
    merge = frame.get("merge")
    if merge is not None:
        if frame["argv"] is not None or frame["shell"] is not None:
            return "a merge carries its command in merge, not in argv or shell"
        outputs = merge.get("outputs")
        if not isinstance(outputs, str) or not outputs.startswith("/"):
            return "merge.outputs must be a path on the master"
        if not _is_int(frame["shard_count"]) or frame["shard_count"] < 1:
            return "shard_count must be a positive integer"
        problem = _command_problem(merge.get("argv"), merge.get("shell"))
        if problem:
            return f"merge: {problem}"
    else:
        problem = _command_problem(frame["argv"], frame["shell"])
        if problem:
            return problem
    for name in ("env", "secret_env"):
        if not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str)
            for k, v in frame.get(name, {}).items()
        ):
            return f"{name} must map names to strings"
    timeout = frame["timeout"]
    if timeout is not None and timeout <= 0:
        return "timeout must be a positive number or null"
    return None


def _command_problem(argv: Any, shell: Any) -> str | None:
    if (argv is None) == (shell is None):
        return "exactly one of argv and shell must be set"
    if argv is not None and (
        not isinstance(argv, list) or not argv or not all(isinstance(x, str) for x in argv)
    ):
        return "argv must be a non-empty list of strings"
    if shell is not None and (not isinstance(shell, str) or not shell.strip()):
        return "shell must be a non-empty string"
    return None


# --------------------------------------------------------------------------
# Shell: files


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_all(fd, data)
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
    """The finished frames a previous run left unacknowledged, in attempt order."""
    frames, _ = _read_spool(state_dir / "spool")
    return [frames[attempt] for attempt in sorted(frames)]


def _read_spool(spool: Path) -> tuple[dict[int, dict[str, Any]], list[Path]]:
    """Finished frames by attempt, and the one-file-per-result files they came from.

    Agents before 0.2 wrote a file per result (`<attempt>.json`); those are read
    too, so an upgrade loses nothing.
    """
    frames: dict[int, dict[str, Any]] = {}
    legacy: list[Path] = []
    if not spool.is_dir():
        return frames, legacy
    for path in sorted(spool.glob("*.json")):
        try:
            frame = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable spool file %s: %s", path, exc)
            continue
        if isinstance(frame, dict) and _is_int(frame.get("attempt")):
            frames[frame["attempt"]] = frame
            legacy.append(path)
    try:
        lines = (spool / SPOOL_FILE).read_bytes().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
            attempt = record["attempt"]
            if not _is_int(attempt):
                raise ValueError(f"attempt {attempt!r}")
            if record["type"] == "finished":
                frames[attempt] = record
            elif record["type"] == "ack":
                frames.pop(attempt, None)
        except (ValueError, TypeError, KeyError):
            # Only the last line can be torn (a crash inside its write), and that
            # result was never sent: the master retries the attempt.
            logger.warning("skipping an unreadable line of %s: %.200r", SPOOL_FILE, line)
    return frames, legacy


class Spool:
    """The results the master has not acknowledged, in one append-only file.

    A result is appended (one write) before it is sent; its ack appends a line
    too, or empties the file when nothing else is waiting. A file per result cost
    a create, a rename and an unlink: 50 us to 1 ms of CPU per result on ext4 here,
    against about 1 us per append. The file is rewritten with only what is still
    waiting when it has grown, and on every start, so a line torn by a crash is
    never followed by another.
    """

    COMPACT_BYTES = 256 * 1024

    def __init__(self, directory: Path) -> None:
        self.path = directory / SPOOL_FILE
        self.waiting: dict[int, bytes] = {}  # attempt -> its line in the file
        self._fd: int | None = None
        self._size = 0

    def open(self) -> list[dict[str, Any]]:
        """Load what was left (then start a clean file); returns it in attempt order."""
        frames, legacy = _read_spool(self.path.parent)
        self.waiting = {a: _spool_line(frames[a]) for a in sorted(frames)}
        self._rewrite()
        for path in legacy:  # in the new file now
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return [frames[a] for a in sorted(frames)]

    def write(self, attempt: int, frame: dict[str, Any]) -> None:
        line = _spool_line(frame)
        _write_all(self._fd, line)  # type: ignore[arg-type]
        self.waiting[attempt] = line
        self._size += len(line)

    def remove(self, attempt: int) -> None:
        if self.waiting.pop(attempt, None) is None:
            return
        if not self.waiting:
            os.ftruncate(self._fd, 0)  # type: ignore[arg-type]
            self._size = 0
        elif self._size > self.COMPACT_BYTES:
            self._rewrite()
        else:
            line = b'{"type":"ack","attempt":%d}\n' % attempt
            _write_all(self._fd, line)  # type: ignore[arg-type]
            self._size += len(line)

    def close(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not self.waiting:  # a clean drain leaves an empty spool directory
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _rewrite(self) -> None:
        data = b"".join(self.waiting.values())
        _atomic_write(self.path, data)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)


def _spool_line(frame: dict[str, Any]) -> bytes:
    return (_encode(frame) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --------------------------------------------------------------------------
# Shell: registration and reconnect policy


class Backoff:
    """Exponential backoff with jitter: 0.5 s doubling to a 15 s cap (lower
    while work is at stake: see reconnect_cap)."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL_S,
        cap: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial, self.cap, self.rng = initial, cap, rng
        self.failures = 0

    def next_delay(self, cap: float | None = None) -> float:
        """The next wait; `cap` lowers the cap for this one (see reconnect_cap)."""
        cap = self.cap if cap is None else min(self.cap, cap)
        base = min(cap, self.initial * 2**self.failures)
        self.failures = min(self.failures + 1, 32)
        # +-20% so a master restart is not met by every agent in the same millisecond.
        return min(cap, base * (0.8 + 0.4 * self.rng()))

    def reset(self) -> None:
        self.failures = 0


class ServerRotation:
    """Which of the agent's servers (several `serve` processes of one install)
    to connect to: the first, until it fails SWITCH_AFTER_FAILURES times in a
    row, then the next, round-robin.

    A failure is a connection that could not be opened, a handshake refused
    (401/403 aside: those end the agent), a connection closed before the
    welcome, and the end of a welcomed one. One failure alone may be a blip (a
    dropped socket, a service manager's quick restart) that the same server
    answers on the next try; a second one in a row means it is down, and
    moving costs only that one extra attempt, a second or so with the backoff.
    With one server (or one URL behind a load balancer) nothing ever moves.
    """

    def __init__(self, servers: Sequence[str], switch_after: int = SWITCH_AFTER_FAILURES) -> None:
        if not servers:
            raise ValueError("at least one server is needed")
        self.servers = tuple(servers)
        self.switch_after = switch_after
        self.index = 0
        self.failures = 0  # in a row, on the current server

    @property
    def current(self) -> str:
        return self.servers[self.index]

    def welcomed(self) -> None:
        self.failures = 0

    def failed(self) -> str | None:
        """Count a failure of the current server; the next server if it is time
        to move to it, else None."""
        self.failures += 1
        if self.failures < self.switch_after or len(self.servers) == 1:
            return None
        previous, count = self.current, self.failures
        self.index = (self.index + 1) % len(self.servers)
        self.failures = 0
        logger.warning(
            "server %s failed %d times in a row; moving to %s", previous, count, self.current
        )
        return self.current


def tls_verify(ca_file: str | None) -> str | bool:
    """requests' `verify`: the private CA's file, or the system's CAs. Never off."""
    return ca_file or True


def ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """websockets' `ssl` for a wss:// URL: hostname and chain checked, against
    the private CA's file when given (None for ws://, which takes no context)."""
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=ca_file)


def register(
    servers: Sequence[str],
    token: str,
    *,
    name: str,
    capacity: int,
    labels: Sequence[str],
    state_dir: Path,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    ca_file: str | None = None,
) -> dict[str, Any]:
    """Enroll with the master and store the credential; retries while it is
    unreachable, moving through `servers` as ServerRotation says."""
    import requests  # only needed once per node, keeps `--help` fast

    backoff = backoff or Backoff()
    rotation = ServerRotation(servers)
    body = {
        "token": token,
        "name": name,
        "hostname": socket.gethostname(),
        "capacity": capacity,
        "labels": list(labels),
    }
    while True:
        server = rotation.current
        url = server + "/api/workers/register"
        try:
            response = requests.post(url, json=body, timeout=30, verify=tls_verify(ca_file))
        except requests.RequestException as exc:
            delay = backoff.next_delay()
            logger.warning("cannot reach %s (%s); retrying in %.1fs", url, exc, delay)
            rotation.failed()
            sleep(delay)
            continue
        if response.status_code >= 500:
            delay = backoff.next_delay()
            logger.warning(
                "registration at %s failed: HTTP %s; retrying in %.1fs",
                url,
                response.status_code,
                delay,
            )
            rotation.failed()
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


# Per HTTP request of a merge's input download: connecting, and silence between bytes.
FETCH_TIMEOUT_S = 60.0
FETCH_BLOCK_BYTES = 256 * 1024


class ShardFetchError(Exception):
    """The master refused or failed to serve a shard's output to a merge."""


def fetch_shard_outputs(
    server: str,
    credential: str,
    path: str,
    count: int,
    directory: Path,
    stop: threading.Event | None = None,
    ca_file: str | None = None,
) -> Path:
    """Blocking (run it in a thread): GET <server><path>, every shard's stdout
    in one answer, into <directory>/shards/<i> each and, in shard order, into
    <directory>/stdin, which is returned. Raises ShardFetchError or OSError;
    ShardFetchError too as soon as `stop` is set (checked between blocks)."""
    import requests

    shards_dir = directory / "shards"
    shards_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stdin = directory / "stdin"
    headers = {
        "Authorization": f"Bearer {credential}",
        "User-Agent": f"scheduler-agent/{AGENT_VERSION}",
    }
    try:
        with requests.get(
            f"{server.rstrip('/')}{path}",
            headers=headers,
            stream=True,
            timeout=FETCH_TIMEOUT_S,
            verify=tls_verify(ca_file),
        ) as response:
            if response.status_code != 200:
                raise ShardFetchError(f"HTTP {response.status_code} {response.text[:200]}")
            with open(stdin, "wb") as joined:
                _split_shards(response.raw, count, shards_dir, joined, stop)
    except requests.RequestException as exc:
        raise ShardFetchError(str(exc)) from None
    return stdin


def _split_shards(
    stream, count: int, shards_dir: Path, joined, stop: threading.Event | None
) -> None:
    """Read `count` framed shard outputs ("<index> <length>\n" and the bytes)
    into one file each and, in order, into `joined`."""
    for index in range(count):
        if stop is not None and stop.is_set():
            raise ShardFetchError(f"stopped before shard {index}")
        header = stream.readline(64)
        parts = header.split()
        if len(parts) != 2 or parts[0] != str(index).encode() or not parts[1].isdigit():
            raise ShardFetchError(f"shard {index}: bad frame header {header[:64]!r}")
        left = int(parts[1])
        with open(shards_dir / str(index), "wb") as out:
            while left:
                if stop is not None and stop.is_set():
                    raise ShardFetchError("stopped while downloading")
                block = stream.read(min(left, FETCH_BLOCK_BYTES))
                if not block:
                    raise ShardFetchError(f"shard {index}: the answer ended early")
                out.write(block)
                joined.write(block)
                left -= len(block)


def websocket_url(server: str) -> str:
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/agent/", "", ""))


# --------------------------------------------------------------------------
# Shell: the watchdog

# A watchdog that exits this soon after its start, three times in a row, is given up.
WATCHDOG_MIN_LIFE_S = 1.0

# The watchdog's whole program, run by `python -I -S -c`. Its stdin is a pipe whose
# only writer is the agent: "+PGID" when a command's group starts, "-PGID" once it
# is gone. EOF means the agent is gone, however it died (a SIGKILL runs no code of
# ours), and every group still listed is killed so that no command runs on next to
# the retry the master starts elsewhere.
WATCHDOG_SOURCE = """\
import os, select, signal
# It ends with the agent, or by SIGKILL: a service manager's SIGTERM to every
# process lets the agent drain first, and the EOF then ends this.
for number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)
groups, rest = set(), b""
os.set_blocking(0, False)
# POLLHUP alone: the agent's writes must not wake us (a wake-up per command would
# cost more than the rest of the watch), only its end; what it wrote is read then,
# and once a second so that the pipe never fills.
hangup = select.poll()
hangup.register(0, select.POLLHUP)
while True:
    try:
        data = os.read(0, 1 << 20)
    except BlockingIOError:
        hangup.poll(1000)
        continue
    if not data:
        break
    *lines, rest = (rest + data).split(b"\\n")
    for line in lines:
        (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchdog:
    """Kills the agent's command groups when the agent dies; one small process per agent.

    This replaces PR_SET_PDEATHSIG, which needs a preexec_fn and so costs every
    spawn a full fork instead of a vfork (2 ms of CPU instead of 0.6 here). It also
    covers the commands' own children: it kills whole groups.
    """

    def __init__(self) -> None:
        self.groups: set[int] = set()
        self.restarts = 0
        # It cannot start or keeps dying at once: say so once, not per command.
        self.disabled = False
        self._quick_deaths = 0
        self._started_at = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None  # the write end of its stdin; only we hold it
        self._pidfd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def watch(self, pgid: int) -> None:
        self.groups.add(pgid)
        self._tell(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        # Promptly: a group id left listed could be reused by someone else's process.
        self.groups.discard(pgid)
        if self._fd is not None:
            self._tell(b"-%d\n" % pgid)

    def start(self) -> None:
        if self._proc is None:
            self._start()

    def close(self) -> None:
        """A clean exit: it SIGKILLs the groups still listed (leftovers), then exits."""
        self._stop(kill_first=False)

    def _tell(self, line: bytes) -> None:
        if self._fd is None:
            self._start()  # tells it every group, this one included
            return
        try:
            os.write(self._fd, line)  # at most PIPE_BUF bytes: written whole or not at all
        except OSError as exc:
            # EPIPE: it died. EAGAIN: the pipe is full, it is stuck; never block the agent.
            logger.warning("watchdog unreachable (%s); restarting it", exc)
            self._restart()

    def _start(self) -> None:
        if self.disabled:
            return
        try:
            read_end, write_end = os.pipe()  # both close-on-exec: commands never hold them
        except OSError as exc:  # out of descriptors: the next command tries again
            logger.error("cannot start the watchdog (%s)", exc)
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG_SOURCE, "scheduler-agent-watchdog"],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                cwd="/",  # pins no directory of ours
                # Its own session: the terminal's Ctrl-C must not end it before the
                # agent's drain does.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(write_end)
            self.disabled = True
            logger.error("cannot start the watchdog (%s): commands may outlive a killed agent", exc)
            return
        finally:
            os.close(read_end)
        with contextlib.suppress(AttributeError, OSError):  # Linux; 64 KiB otherwise
            # It reads once a second: room for a second of lines at any spawn rate.
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        if self.groups:
            # Blocking, into an empty pipe: it holds thousands of groups.
            _write_all(write_end, b"".join(b"+%d\n" % pgid for pgid in self.groups))
        os.set_blocking(write_end, False)
        self._fd = write_end
        self._started_at = time.monotonic()
        self._notice_death()

    def _notice_death(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._pidfd = os.pidfd_open(self._proc.pid)  # type: ignore[union-attr]
        except (RuntimeError, AttributeError, OSError):
            return  # no loop or no pidfd: the next write notices (EPIPE)
        self._loop.add_reader(self._pidfd, self._died)

    def _died(self) -> None:
        code = self._proc.poll() if self._proc is not None else None
        quick = time.monotonic() - self._started_at < WATCHDOG_MIN_LIFE_S
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        if self._quick_deaths >= 3:
            # Restarting a watchdog that cannot live would only spin.
            self._stop(kill_first=True)
            self.disabled = True
            logger.error(
                "the watchdog keeps exiting (%s): commands may outlive a killed agent", code
            )
            return
        logger.warning("the watchdog exited (%s); restarting it", code)
        self._restart()

    def _restart(self) -> None:
        self._stop(kill_first=True)
        self.restarts += 1
        self._start()

    def _stop(self, *, kill_first: bool) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)  # type: ignore[union-attr]
            os.close(self._pidfd)
        proc, fd = self._proc, self._fd
        self._proc = self._fd = self._pidfd = None
        if proc is None:
            return
        if kill_first:
            # Closing the pipe of a live watchdog would make it kill every group.
            proc.kill()
        if fd is not None:
            os.close(fd)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("the watchdog did not exit; killing it")
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# Shell: asyncio


class Socket(Protocol):
    """What the shell needs from a websocket connection (a fake one in tests)."""

    async def send(self, message: str) -> None: ...
    async def close(self) -> None: ...
    def __aiter__(self) -> Any: ...


@dataclass(eq=False)
class _Run:
    """A live process group of one attempt, as the shell sees it."""

    attempt: int
    proc: subprocess.Popen[bytes]
    pgid: int
    pipes: list[int]  # read ends of stdout and stderr still open
    returncode: int | None = None  # of the leader, once reaped
    pidfd: int | None = None
    deadline: asyncio.TimerHandle | None = None
    escalation: asyncio.TimerHandle | None = None  # SIGKILL after the SIGTERM's grace
    killed: bool = False  # the SIGKILL went out
    released: bool = False  # the watchdog no longer lists the group


@dataclass(frozen=True)
class AgentConfig:
    servers: tuple[str, ...]  # several `serve` processes of one install, tried in turn
    name: str
    capacity: int = 4
    labels: tuple[str, ...] = ()
    state_dir: Path = Path(".")
    drain_timeout: float = 30.0
    # Names of the agent's own variables its commands also get (beyond PASSED_ENV).
    pass_env: tuple[str, ...] = ()
    # A private CA's certificates (PEM) to verify https/wss servers with.
    ca_file: str | None = None


# One encoder for every frame: json.dumps() with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode(frame: dict[str, Any]) -> str:
    return _ENCODER.encode(frame)


def encode_messages(
    frames: Sequence[dict[str, Any]], protocol: int, max_bytes: int
) -> list[tuple[str, int]]:
    """The websocket messages that carry these frames in order, each with its frame count."""
    return pack([_ENCODER.encode(frame) for frame in frames], protocol, max_bytes)


def _cannot_start(exc: Exception, argv: list[str]) -> str:
    where = getattr(exc, "filename", None)
    where = argv[0] if where is None else where
    return f"cannot start: {getattr(exc, 'strerror', None) or exc} ({where})"


class Agent:
    """The asyncio shell around AgentCore: socket, processes, timers, spool."""

    def __init__(self, config: AgentConfig, credential: str, hostname: str | None = None) -> None:
        self.config = config
        self.credential = credential
        ensure_state_dir(config.state_dir)
        self.spool = Spool(config.state_dir / "spool")
        self.core = AgentCore(
            name=config.name,
            hostname=hostname or socket.gethostname(),
            capacity=config.capacity,
            labels=config.labels,
            spooled=self.spool.open(),
        )
        self.backoff = Backoff()
        self.rotation = ServerRotation(config.servers)
        self.watchdog = Watchdog()
        self._runs: dict[int, _Run] = {}
        # Merges' downloaded inputs (<state dir>/merge/<attempt>), deleted when
        # the merge ends; what a crash left behind goes at the next start.
        self._merge_root = config.state_dir / "merge"
        shutil.rmtree(self._merge_root, ignore_errors=True)
        self._fetches: set[asyncio.Task[None]] = set()
        # A merge's download in progress, by attempt: set to stop it (a cancel).
        self._fetch_stops: dict[int, threading.Event] = {}
        self._inputs: set[int] = set()  # attempts with a directory there
        # Ended attempts whose leftovers are still inside their SIGTERM grace.
        self._lingering: set[_Run] = set()
        self._devnull: int | None = None
        # What commands get of the agent's environment, as bytes, taken once:
        # rebuilding it from os.environ for every command decodes and re-encodes
        # each variable (20 us a spawn).
        self._environ = command_environ(dict(os.environb), config.pass_env)
        # Frames waiting for the send loop, and those it took but has not written.
        self._outbox: collections.deque[dict[str, Any]] | None = None
        self._outbox_ready = asyncio.Event()
        self._inflight: list[dict[str, Any]] = []
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
                if self._outbox is not None:
                    self._outbox.append(out.frame)
                    self._outbox_ready.set()
                else:
                    logger.debug("dropping %s frame: no connection", out.frame.get("type"))
            elif isinstance(out, StartProcess):
                self._start(out)
            elif isinstance(out, KillProcess):
                run = self._runs.get(out.attempt)
                if run is not None:
                    self._terminate(run)
                elif out.attempt in self._fetch_stops:
                    # A merge still downloading its inputs: stop between blocks.
                    self._fetch_stops[out.attempt].set()
            elif isinstance(out, WriteSpool):
                self.spool.write(out.attempt, out.frame)
            elif isinstance(out, RemoveSpool):
                self.spool.remove(out.attempt)
            elif isinstance(out, FetchShardOutputs):
                task = asyncio.get_running_loop().create_task(self._fetch_inputs(out))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)
            elif isinstance(out, Welcomed):
                self.backoff.reset()
                self.rotation.welcomed()
                logger.info("connected as worker %s (%s)", out.worker_id, self.config.name)
                if self._heartbeat is not None:
                    self._heartbeat.cancel()
                self._heartbeat = asyncio.create_task(self._beat(out.heartbeat_s))
        self._changed.set()

    # -- processes ----------------------------------------------------------
    #
    # No task or thread per process: the leader's exit and its pipes are file
    # descriptors in the event loop, and the attempt ends when all three are done.

    async def _fetch_inputs(self, fetch: FetchShardOutputs) -> None:
        """Download a merge's inputs in a thread (never blocking the loop: other
        commands' output and the heartbeats go on meanwhile)."""
        directory = self._merge_root / str(fetch.attempt)
        self._inputs.add(fetch.attempt)
        stop = self._fetch_stops[fetch.attempt] = threading.Event()
        try:
            stdin = await asyncio.to_thread(
                fetch_shard_outputs,
                # The server this assign came from: the one we are connected to.
                self.rotation.current,
                self.credential,
                fetch.path,
                fetch.count,
                directory,
                stop,
                self.config.ca_file,
            )
        except (ShardFetchError, OSError) as exc:
            self._drop_inputs(fetch.attempt)
            self.dispatch(self.core.shard_outputs_failed(fetch.attempt, str(exc), time.time()))
            return
        finally:
            self._fetch_stops.pop(fetch.attempt, None)
        outputs = self.core.shard_outputs_fetched(
            fetch.attempt, str(directory / "shards"), str(stdin), time.time()
        )
        if not any(isinstance(out, StartProcess) for out in outputs):
            self._drop_inputs(fetch.attempt)  # cancelled while it downloaded
        self.dispatch(outputs)

    def _drop_inputs(self, attempt: int) -> None:
        if attempt in self._inputs:
            self._inputs.discard(attempt)
            shutil.rmtree(self._merge_root / str(attempt), ignore_errors=True)

    def _start(self, start: StartProcess) -> None:
        """Spawn the command as the leader of a new process group, and watch it."""
        if self._devnull is None:
            self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        fds: list[int] = []
        stdin = self._devnull
        try:
            if start.stdin is not None:
                stdin = os.open(start.stdin, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(stdin)
            # Our own pipes: the attempt's output ends when every holder closed them,
            # which a grandchild like `sleep 1000 &` may delay past the leader's exit.
            out_r, out_w = os.pipe()
            fds += (out_r, out_w)
            err_r, err_w = os.pipe()
            fds += (err_r, err_w)
            # No preexec_fn, so CPython spawns with vfork; the watchdog does what
            # PR_SET_PDEATHSIG did in a preexec_fn.
            proc = subprocess.Popen(
                start.argv,
                stdin=stdin,
                stdout=out_w,
                stderr=err_w,
                env=self._command_env(start.env),
                cwd=start.cwd,
                start_new_session=True,  # its own process group, killed as one
            )
        # ValueError: a NUL byte in argv or env.
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in fds:
                os.close(fd)
            if start.stdin is not None:
                self._drop_inputs(start.attempt)
            reason = _cannot_start(exc, start.argv)
            self.dispatch(self.core.process_failed_to_start(start.attempt, reason, time.time()))
            return
        os.close(out_w)
        os.close(err_w)
        if start.stdin is not None:
            os.close(stdin)  # the child has its own copy
        run = _Run(start.attempt, proc, proc.pid, [out_r, err_r])
        self._runs[start.attempt] = run
        self.watchdog.watch(run.pgid)
        self.dispatch(self.core.process_started(start.attempt, proc.pid, time.time()))
        loop = asyncio.get_running_loop()
        for fd, stream in ((out_r, "stdout"), (err_r, "stderr")):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._readable, run, fd, stream)
        self._wait_for_exit(run, loop)
        if start.timeout is not None:
            run.deadline = loop.call_later(
                start.timeout, lambda: self.dispatch(self.core.deadline_passed(start.attempt))
            )

    def _command_env(self, overlay: dict[str, str]) -> dict[bytes, bytes]:
        env = self._environ.copy()
        for name, value in overlay.items():
            env[os.fsencode(name)] = os.fsencode(value)
        return env

    def _wait_for_exit(self, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        try:
            # Readable once the leader exits, even if it already has: we have not reaped it.
            run.pidfd = os.pidfd_open(run.proc.pid)
        except (AttributeError, OSError):
            # No pidfd (not Linux, or before 5.3): a thread blocks in waitpid instead.
            threading.Thread(target=self._wait_in_thread, args=(run, loop), daemon=True).start()
        else:
            loop.add_reader(run.pidfd, self._reap, run)

    def _wait_in_thread(self, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        returncode = run.proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent exited
            loop.call_soon_threadsafe(self._leader_exited, run, returncode)

    def _reap(self, run: _Run) -> None:
        returncode = run.proc.poll()  # Popen reaps it, so it never waits on a stale pid
        if returncode is None:
            return
        asyncio.get_running_loop().remove_reader(run.pidfd)
        os.close(run.pidfd)  # type: ignore[arg-type]
        run.pidfd = None
        self._leader_exited(run, returncode)

    def _leader_exited(self, run: _Run, returncode: int) -> None:
        if self._runs.get(run.attempt) is not run:
            return  # close() already reaped it (the waiting thread was late)
        run.returncode = returncode
        if run.deadline is not None:
            run.deadline.cancel()
        # The attempt ends with its leader; leftovers of the group go too, and their
        # end closes the pipes.
        self._terminate(run)
        self._finish_if_done(run)

    def _readable(self, run: _Run, fd: int, stream: str) -> None:
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.dispatch(self.core.output(run.attempt, stream, data))
            if self._flush_handle is None and self.core.has_pending_logs:
                self._flush_handle = asyncio.get_running_loop().call_later(
                    LOG_FLUSH_S, self._flush_logs
                )
            return
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        run.pipes.remove(fd)
        self._finish_if_done(run)

    def _finish_if_done(self, run: _Run) -> None:
        if run.returncode is None or run.pipes or self._runs.get(run.attempt) is not run:
            return
        del self._runs[run.attempt]
        self._drop_inputs(run.attempt)
        # Without a pending escalation the group was empty when the leader exited.
        if run.escalation is None or run.killed or not _killpg(run.pgid, 0):
            self._release(run)
        else:
            self._lingering.add(run)
        self.dispatch(self.core.process_exited(run.attempt, run.returncode, time.time()))

    def _flush_logs(self) -> None:
        self._flush_handle = None
        self.dispatch(self.core.flush_logs())

    def _terminate(self, run: _Run) -> None:
        """SIGTERM the group now, SIGKILL it after KILL_GRACE_S (once per run)."""
        if run.escalation is not None:
            return
        if not _killpg(run.pgid, signal.SIGTERM):
            return  # nobody left in the group
        run.escalation = asyncio.get_running_loop().call_later(KILL_GRACE_S, self._escalate, run)

    def _escalate(self, run: _Run) -> None:
        _killpg(run.pgid, signal.SIGKILL)
        run.killed = True
        if self._runs.get(run.attempt) is not run:
            self._release(run)  # the attempt already ended; only leftovers were left

    def _release(self, run: _Run) -> None:
        """The group is gone (or SIGKILLed): stop the timers and the watchdog's watch.

        Exactly once per run: its group id may belong to a newer run by now.
        """
        if run.released:
            return
        run.released = True
        self._lingering.discard(run)
        if run.escalation is not None:
            run.escalation.cancel()
        self.watchdog.forget(run.pgid)

    def close(self) -> None:
        """Kill what still runs or lingers, reap it, stop the watchdog: nothing is left."""
        for run in [*self._runs.values(), *self._lingering]:
            _killpg(run.pgid, signal.SIGKILL)
            self._release(run)
        for run in self._runs.values():
            self._reap_now(run)
        self._runs.clear()
        self.watchdog.close()
        self.spool.close()
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None

    def _reap_now(self, run: _Run) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(timeout=KILL_GRACE_S)
        if run.deadline is not None:
            run.deadline.cancel()
        for fd in [*run.pipes, *([run.pidfd] if run.pidfd is not None else [])]:
            with contextlib.suppress(RuntimeError):  # no loop: nothing to unregister
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        run.pipes, run.pidfd = [], None

    # -- socket ---------------------------------------------------------------

    async def serve(self, ws: Socket) -> None:
        """Speak the protocol over one open connection until it closes."""
        self._ws = ws
        self._outbox = outbox = collections.deque()
        self._inflight = []
        self.dispatch(self.core.connection_opened())
        sender = asyncio.create_task(self._send_loop(ws, outbox))
        receiver = asyncio.create_task(self._receive_loop(ws))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver, self._heartbeat):
                if task is not None:
                    task.cancel()
            for outcome in await asyncio.gather(sender, receiver, return_exceptions=True):
                if isinstance(outcome, Exception):
                    # A closed socket ends a loop quietly; anything else is a bug of ours.
                    logger.error("connection loop failed", exc_info=outcome)
            self._heartbeat = None
            unsent = [*self._inflight, *outbox]
            self._inflight = []
            self._outbox = None
            self._ws = None
            self.core.connection_lost(unsent)
            self._changed.set()
            code = getattr(ws, "close_code", None)
            level = logging.INFO if self._closing else logging.WARNING
            logger.log(level, "disconnected from master (close code %s)", code)

    async def _send_loop(self, ws: Socket, outbox: collections.deque[dict[str, Any]]) -> None:
        """Send whatever is queued as one message (or a few), never waiting for an ack."""
        from websockets.exceptions import ConnectionClosed

        ready = self._outbox_ready
        while True:
            if not outbox:
                ready.clear()
                await ready.wait()
            # One turn of the loop lets frames produced along with this one join it
            # (a spawn's `started` after its `accepted`); under load, whatever piled
            # up during the last send leaves in the next message.
            await asyncio.sleep(0)
            self._inflight = frames = list(outbox)
            outbox.clear()
            for message, count in encode_messages(
                frames, self.core.protocol, self.core.max_frame_bytes
            ):
                try:
                    await ws.send(message)
                except ConnectionClosed:
                    return
                del frames[:count]
            self._changed.set()

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

        while True:
            url = websocket_url(self.rotation.current)
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.credential}"},
                    ssl=ssl_context(url, self.config.ca_file),
                    max_size=MAX_FRAME_BYTES,
                    ping_interval=PING_INTERVAL_S,
                    ping_timeout=PING_TIMEOUT_S,
                    # A host gone silent must not hold one attempt much longer
                    # than the wait between two (a tenth of the fence while
                    # work is at stake), within 2-10 s for a slow handshake.
                    open_timeout=min(OPEN_TIMEOUT_S, max(2.0, self.core.backoff_cap)),
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
            # Whatever ended this connection, the server failed us once.
            self.rotation.failed()
            delay = self.backoff.next_delay(self.core.backoff_cap)
            logger.info("reconnecting to %s in %.1fs", self.rotation.current, delay)
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
            # The operator insists: no grace for processes that ignore SIGTERM,
            # nor for what an ended command left behind in its group.
            for run in [*self._runs.values(), *self._lingering]:
                _killpg(run.pgid, signal.SIGKILL)
        self._changed.set()

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM and the drain (exit 0) or the master refuses us (exit 3)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self.watchdog.start()  # now, not in the first command's spawn
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
            self.close()

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
                lambda: not self._runs, loop.time() + KILL_GRACE_S + 1.0, hurry_stops=False
            )
            # Only results produced by the kill are worth the extra wait; older ones
            # already had the whole drain to be acknowledged.
            if killed and not self._hurry.is_set():
                await self._wait_for(lambda: self.core.drained, loop.time() + DRAIN_ACK_WAIT_S)
        self._closing = True
        ws = self._ws
        await self._wait_for(
            lambda: not self._outbox and not self._inflight,
            loop.time() + SEND_FLUSH_S,
            hurry_stops=False,
        )
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


def _servers(value: str) -> tuple[str, ...]:
    """One --server value: a URL, or several separated by commas."""
    urls = tuple(_server(item) for item in value.split(",") if item.strip())
    if not urls:
        raise argparse.ArgumentTypeError(f"{value!r} names no server")
    return urls


class _ServerList(argparse.Action):
    """--server may be repeated: every URL given, in order, each once."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        servers = list(getattr(namespace, self.dest) or ())
        for url in values:
            # Compared after _server's normalisation: http://m/ is http://m.
            if url in servers:
                raise argparse.ArgumentError(self, f"{url!r} is given more than once")
            servers.append(url)
        setattr(namespace, self.dest, tuple(servers))


def _capacity(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not MIN_CAPACITY <= number <= MAX_CAPACITY:
        raise argparse.ArgumentTypeError(
            f"{number} is not between {MIN_CAPACITY} and {MAX_CAPACITY}"
        )
    return number


def _labels(value: str) -> tuple[str, ...]:
    labels = tuple(item.strip() for item in value.split(",") if item.strip())
    if len(labels) > MAX_LABELS:
        raise argparse.ArgumentTypeError(f"{len(labels)} labels; at most {MAX_LABELS}")
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


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a variable name")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_state = os.environ.get("SCHEDULER_AGENT_STATE_DIR") or "~/.local/state/scheduler-agent"
    parser = argparse.ArgumentParser(
        prog="scheduler-agent", description="Run the scheduler master's tasks on this node."
    )
    parser.add_argument(
        "--server",
        dest="servers",
        metavar="URL",
        required=True,
        type=_servers,
        action=_ServerList,
        help="master URL, http(s)://HOST:PORT; repeat it or separate URLs with commas for"
        " several servers of one install, tried in turn when one is unreachable",
    )
    parser.add_argument(
        "--token",
        help="enrollment token (only needed the first time); visible to every user in `ps`:"
        f" prefer --token-file or {TOKEN_ENV}",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the enrollment token (only needed the first time)",
    )
    parser.add_argument(
        "--ca-file",
        help="PEM file of the CA that signed the master's certificate (a private CA);"
        " default: the system's CAs. TLS is always verified for https servers",
    )
    parser.add_argument("--name", type=_name, default=None, help="worker name (default: hostname)")
    parser.add_argument(
        "--capacity",
        type=_capacity,
        default=4,
        help=f"parallel slots, {MIN_CAPACITY}-{MAX_CAPACITY}",
    )
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
    parser.add_argument(
        "--pass-env",
        dest="pass_env",
        metavar="NAME",
        action="append",
        type=_env_name,
        default=[],
        help="also give commands this variable of the agent's environment (repeatable);"
        f" they always get {', '.join(PASSED_ENV)} and LC_*",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {AGENT_VERSION}")
    return parser


TOKEN_ENV = "SCHEDULER_ENROLLMENT_TOKEN"


def enrollment_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """--token, else --token-file, else $SCHEDULER_ENROLLMENT_TOKEN; exits if none."""
    if args.token:
        return args.token
    if args.token_file:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            parser.error(f"--token-file: {exc}")
        if not token:
            parser.error(f"--token-file {args.token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        parser.error(
            f"an enrollment token is required to enroll (no credential in {args.state_dir}):"
            f" set {TOKEN_ENV} or pass --token-file"
        )
    return token


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
    if args.ca_file and not os.path.isfile(args.ca_file):
        parser.error(f"--ca-file {args.ca_file}: no such file")
    if stored is None:
        token = enrollment_token(args, parser)
        try:
            stored = register(
                args.servers,
                token,
                name=name,
                capacity=args.capacity,
                labels=args.labels,
                state_dir=state_dir,
                ca_file=args.ca_file,
            )
        except RegistrationRefused as exc:
            print(f"registration refused: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    elif stored.get("server") and stored["server"] not in args.servers:
        # Any server of the install accepts the credential; one from elsewhere
        # is refused (exit 3), and this says why.
        logger.warning(
            "credential in %s was issued by %s, which is not among --server",
            state_dir,
            stored["server"],
        )
    config = AgentConfig(
        servers=args.servers,
        name=name,
        capacity=args.capacity,
        labels=args.labels,
        state_dir=state_dir,
        drain_timeout=args.drain_timeout,
        pass_env=tuple(args.pass_env),
        ca_file=args.ca_file,
    )

    async def _main() -> int:
        return await Agent(config, stored["credential"]).run()

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
