"""The in-process scheduler service: periodic duties of the master.

Daphne has no ASGI lifespan, so `manage.py serve` starts this on daphne's
event loop. Each duty is a small method returning "did I find work?", so
tests call them directly; the database is the source of truth, so a duty
that misses a beat (or a lost channel message) is caught up on the next.
The duties run on the writer's thread, between its batches, so they never
contend with the hot paths for SQLite's write lock.

Several servers (PostgreSQL + Redis): every server runs every duty, and
none is led through a lease. Each duty decides by conditional UPDATEs and
row locks, re-checked by PostgreSQL after a lock wait, so two servers
sweeping at once cannot both win: an attempt is declared lost once (its row
is locked, then moves only if still active), retried once (unique run,
shard, try), handed back once (only if still assigned and unaccepted), and a
cron tick fires once (unique task, scheduled time). A lease would add a gap
after its holder dies (its time to live, during which no worker is reaped
and no timeout enforced) and a second code path for one server and many;
running everywhere costs each server a few indexed reads a tick. A race
lost to another server's transaction (a deadlock or lock timeout) is
retried on the next tick, and is not taken for a database outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from django.conf import settings
from django.db import DatabaseError

from tasks_app import lifecycle, notify, retention, scheduling
from tasks_app.writer import writer
from workers_app import dispatch, liveness, servers, stuck
from workers_app.peers import peers

log = logging.getLogger(__name__)

# The event loop woke this much later than asked: frames from agents may be
# waiting unread, so their silence says nothing (seconds, on top of a tick).
OVERLOAD_LAG_S = 1.0
# A duty that found nothing to do looks again after this long (seconds): the
# stuck-queue check reads every worker taking work (retention's pruner keeps
# its own pace).
IDLE_RECHECK_S = {"check_stuck_queues": 15.0}

# When a service of this process last finished a tick (time.monotonic()), None
# before the first: /readyz says this server is not ready once it is too old
# (scheduler_site.health). A float, written by the writer's thread and read by
# requests' threads whole.
last_tick: float | None = None


def since_last_tick() -> float | None:
    """Seconds since this process's service finished a tick; None if it never did."""
    return None if last_tick is None else time.monotonic() - last_tick


class SchedulerService:
    def __init__(self) -> None:
        # Liveness is judged only from this moment on: see recovering().
        self.alive_since = time.monotonic()
        self.database_down = False
        self.stopping = asyncio.Event()
        # Webhooks and e-mail go out on threads of their own: a slow receiver
        # never holds the writer's thread, which these duties share with dispatch.
        self.sender = notify.Sender()
        # Retention's batches, likewise off the writer's thread.
        self.pruner = retention.Pruner()
        self._idle_until: dict[str, float] = {}

    def recovering(self) -> bool:
        """True for SCHEDULER_LOST_AFTER_S after our start, after our database
        came back, or after this process fell behind its own event loop.

        During our own outage (a restart, the database out of reach, or a
        backlog of unread frames) every agent may look silent and no accept or
        result could arrive: give them a full grace period before judging any.
        """
        return time.monotonic() - self.alive_since < settings.SCHEDULER_LOST_AFTER_S

    def touch_server(self) -> bool:
        # Our row in the live-servers table: the others know we are alive.
        servers.heartbeat()
        return False

    def reap_lost_workers(self) -> bool:
        if self.recovering():
            liveness.flush_heartbeats()
            return False
        return bool(liveness.reap_lost())

    def requeue_unaccepted(self) -> bool:
        if self.recovering():
            return False
        moved = lifecycle.requeue_unaccepted()
        if moved:
            log.warning(
                "not accepted within %ss, handed back unaccepted: attempts %s",
                settings.SCHEDULER_ACCEPT_TIMEOUT_S,
                moved,
            )
        return bool(moved)

    def time_out_overdue(self) -> bool:
        if self.recovering():
            return False
        return bool(lifecycle.time_out_overdue())

    def fire_schedules(self) -> bool:
        # Real time: nothing in a server moves tasks_app.clock.
        return bool(scheduling.fire_due())

    def dispatch_queued(self) -> bool:
        # The backstop: re-read the board (slots and queued label sets) from the
        # database, which also brings back retries whose backoff has passed.
        return bool(dispatch.dispatch())

    def plan_notifications(self) -> bool:
        # Deliveries for the runs that ended (tasks_app.notify).
        return bool(notify.plan())

    def send_notifications(self) -> bool:
        # Claimed here, sent by self.sender's threads, recorded by them.
        return bool(self.sender.send_due())

    def check_stuck_queues(self) -> bool:
        return self._unless_idle("check_stuck_queues", stuck.check)

    def prune_history(self) -> bool:
        # At most one batch under way (tasks_app.retention), on the pruner's
        # thread: a backlog never holds dispatch up.
        return self.pruner.step()

    def _unless_idle(self, name: str, duty) -> bool:
        """Run `duty`, unless it found nothing less than IDLE_RECHECK_S ago."""
        if time.monotonic() < self._idle_until.get(name, 0.0):
            return False
        found = bool(duty())
        if not found:
            self._idle_until[name] = time.monotonic() + IDLE_RECHECK_S[name]
        return found

    def tick(self) -> bool:
        found = False
        failed = False
        for duty in (
            self.touch_server,
            self.reap_lost_workers,
            self.requeue_unaccepted,
            self.time_out_overdue,
            self.fire_schedules,
            self.dispatch_queued,
            self.plan_notifications,
            self.send_notifications,
            self.check_stuck_queues,
            self.prune_history,
        ):
            try:
                found = duty() or found
            except DatabaseError as exc:
                if _conflict(exc):
                    # Another server's transaction on the same rows won (every
                    # server runs these duties): nothing is wrong with the
                    # database, the next tick tries again.
                    log.warning("scheduler duty %s lost a race: %s", duty.__name__, exc)
                    continue
                failed = True
                log.exception("scheduler duty %s: database error", duty.__name__)
            except Exception:
                # One failing duty must not stop the others or the loop.
                log.exception("scheduler duty %s failed", duty.__name__)
        global last_tick
        last_tick = time.monotonic()
        if failed:
            self.database_down = True
        elif self.database_down:
            self.database_down = False
            self.alive_since = time.monotonic()
            log.warning("database reachable again: worker liveness clock restarted")
        return found

    def note_lag(self, lag: float) -> None:
        """The loop woke, or the writer answered, `lag` seconds late: do not
        judge liveness for a while."""
        if lag > OVERLOAD_LAG_S:
            self.alive_since = time.monotonic()
            log.warning(
                "the server fell %.1fs behind: worker liveness clock restarted "
                "(no worker is declared lost for %ss)",
                lag,
                settings.SCHEDULER_LOST_AFTER_S,
            )

    async def run(self) -> None:
        log.info("scheduler service started (tick %.2fs)", settings.SCHEDULER_TICK_S)
        loop = asyncio.get_running_loop()
        writer.start()
        # Kept: the loop holds tasks only weakly.
        self.listening = loop.create_task(peers.run(self.stopping))
        while not self.stopping.is_set():
            started = loop.time()
            try:
                # How long the writer's backlog is: agents' frames in it (and held
                # back behind it) are not applied yet, so their silence says nothing.
                await writer.call(_nothing)
                self.note_lag(loop.time() - started)
                await writer.call(self.tick)
            except Exception:
                log.exception("scheduler tick failed")
            wait = max(started + settings.SCHEDULER_TICK_S - loop.time(), 0.0)
            due = loop.time() + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=wait)
            # A loop busy elsewhere wakes us late; frames may be waiting unread meanwhile.
            self.note_lag(loop.time() - due)
        # Sends not started yet are dropped: their rows stay claimed until the
        # lease lapses, then another server (or this one, restarted) sends them.
        self.sender.close()


# PostgreSQL's deadlock_detected, serialization_failure, lock_not_available.
CONFLICTS = {"40P01", "40001", "55P03"}


def _conflict(exc: DatabaseError) -> bool:
    """A transaction that lost to a concurrent one, as opposed to a database out of reach."""
    return getattr(exc.__cause__, "sqlstate", None) in CONFLICTS


def _nothing() -> None:
    """A probe of the writer's backlog."""
