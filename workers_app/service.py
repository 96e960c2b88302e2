"""The in-process scheduler service: periodic duties of the master.

Daphne has no ASGI lifespan, so `manage.py serve` starts this on daphne's
event loop. Each duty is a small method returning "did I find work?", so
tests call them directly; the database is the source of truth, so a duty
that misses a beat (or a lost channel message) is caught up on the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError

from tasks_app import lifecycle
from workers_app import dispatch, liveness

log = logging.getLogger(__name__)


class SchedulerService:
    def __init__(self) -> None:
        # Liveness is judged only from this moment on: see reap_lost_workers.
        self.alive_since = time.monotonic()
        self.database_down = False
        self.stopping = asyncio.Event()

    def dispatch_queued(self) -> bool:
        return bool(dispatch.dispatch())

    def recovering(self) -> bool:
        """True for SCHEDULER_LOST_AFTER_S after our start or our database came back.

        During our own outage (a restart, or the database out of reach) every
        agent looks silent and no accept or result could arrive: give them a
        full grace period to reconnect and replay before judging any of them.
        """
        return time.monotonic() - self.alive_since < settings.SCHEDULER_LOST_AFTER_S

    def reap_lost_workers(self) -> bool:
        if self.recovering():
            return False
        return bool(liveness.reap_lost())

    def requeue_unaccepted(self) -> bool:
        if self.recovering():
            return False
        return bool(lifecycle.requeue_unaccepted())

    def time_out_overdue(self) -> bool:
        if self.recovering():
            return False
        return bool(lifecycle.time_out_overdue())

    def tick(self) -> bool:
        found = False
        failed = False
        for duty in (
            self.reap_lost_workers,
            self.requeue_unaccepted,
            self.time_out_overdue,
            self.dispatch_queued,
        ):
            try:
                found = duty() or found
            except DatabaseError:
                failed = True
                log.exception("scheduler duty %s: database error", duty.__name__)
            except Exception:
                # One failing duty must not stop the others or the loop.
                log.exception("scheduler duty %s failed", duty.__name__)
        if failed:
            self.database_down = True
        elif self.database_down:
            self.database_down = False
            self.alive_since = time.monotonic()
            log.warning("database reachable again: worker liveness clock restarted")
        return found

    async def run(self) -> None:
        log.info("scheduler service started (tick %.2fs)", settings.SCHEDULER_TICK_S)
        while not self.stopping.is_set():
            await database_sync_to_async(self.tick)()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=settings.SCHEDULER_TICK_S)
