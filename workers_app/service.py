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

from workers_app import dispatch, liveness

log = logging.getLogger(__name__)


class SchedulerService:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stopping = asyncio.Event()

    def dispatch_queued(self) -> bool:
        return bool(dispatch.dispatch())

    def reap_lost_workers(self) -> bool:
        # After our own outage every worker looks silent: give them a full
        # grace period from our start before declaring any of them lost.
        if time.monotonic() - self.started < settings.SCHEDULER_LOST_AFTER_S:
            return False
        return bool(liveness.reap_lost())

    def tick(self) -> bool:
        found = False
        for duty in (self.reap_lost_workers, self.dispatch_queued):
            try:
                found = duty() or found
            except Exception:
                # One failing duty (a locked database, say) must not stop the others
                # or the loop; the next tick tries again.
                log.exception("scheduler duty %s failed", duty.__name__)
        return found

    async def run(self) -> None:
        log.info("scheduler service started (tick %.2fs)", settings.SCHEDULER_TICK_S)
        while not self.stopping.is_set():
            await database_sync_to_async(self.tick)()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=settings.SCHEDULER_TICK_S)
