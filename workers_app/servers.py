"""The table of live server processes: who else serves this install.

Every `serve` process has a row (Server) that it writes when it starts,
touches on every tick of its service and deletes when it stops. A row is
dead when it has not been touched for SILENT_AFTER_S, or when its process
no longer exists on this very host (a server killed with SIGKILL and
restarted at once must not be refused by its own ghost).

Several servers are correct only on PostgreSQL + Redis: with SQLite two
processes would share one file's write lock and each its own dispatch, and
with the in-memory channel layer a server cannot reach the agents connected
to another. So a server that finds another one alive refuses to start
unless settings.SCALE_OUT; the check and the insert are one transaction
(SQLite's IMMEDIATE lock, or an advisory lock on PostgreSQL), so two
servers starting at once cannot both pass it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from workers_app.exceptions import ServerRefused
from workers_app.models import Server

# A server touches its row every tick (SCHEDULER_TICK_S, 1 s by default).
SILENT_AFTER_S = 15.0
# pg_advisory_xact_lock key of the start-up check ("sched" in ASCII).
_START_LOCK = 0x7363686564

ME = f"{socket.gethostname()}:{os.getpid()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def _is_alive(server: Server, now: dt.datetime) -> bool:
    if server.hostname == socket.gethostname() and not _process_exists(server.pid):
        return False
    return now - server.last_seen < dt.timedelta(seconds=SILENT_AFTER_S)


def alive(now: dt.datetime | None = None) -> list[Server]:
    """The live server processes, this one included once registered."""
    now = now or timezone.now()
    return [s for s in Server.objects.all() if _is_alive(s, now)]


def layer_name() -> str:
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    return "redis" if "redis" in backend.lower() else "in-memory"


def _refusal(others: list[Server]) -> str:
    other = others[0]
    seen = (timezone.now() - other.last_seen).total_seconds()
    who = (
        f"server {other.name} (serving {other.address or '?'}, last seen {seen:.0f}s ago)"
        if len(others) == 1
        else f"{len(others)} servers ({', '.join(o.name for o in others)})"
    )
    if connection.vendor == "sqlite":
        why = (
            f"it runs on the SQLite file {settings.DATABASES['default']['NAME']}, which only one"
            " server process may use"
        )
    else:
        why = (
            "it uses the in-memory channel layer (REDIS_URL is unset), which cannot reach the"
            " agents connected to another server process"
        )
    return (
        f"another server process of this install is alive: {who}. This one cannot start beside"
        f" it: {why}. Stop the other one, or run every server with DATABASE_URL (PostgreSQL)"
        " and REDIS_URL (Redis)."
    )


def register(address: str) -> Server:
    """Enter this process in the table, or raise ServerRefused (see the module doc)."""
    now = timezone.now()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Race: two servers starting at once; each checks after the other's insert.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_START_LOCK])
        rows = list(Server.objects.exclude(name=ME))
        dead = [s.pk for s in rows if not _is_alive(s, now)]
        Server.objects.filter(pk__in=dead).delete()
        others = [s for s in rows if s.pk not in dead]
        if others and not settings.SCALE_OUT:
            raise ServerRefused(_refusal(others))
        server, _ = Server.objects.update_or_create(
            name=ME,
            defaults={
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "address": address[:255],
                "database": connection.vendor,
                "channel_layer": layer_name(),
                "started_at": now,
                "last_seen": now,
            },
        )
    return server


def heartbeat() -> None:
    """Touch our row (one statement a tick); put it back if a peer removed it
    as dead while we stalled."""
    now = timezone.now()
    if not Server.objects.filter(name=ME).update(last_seen=now):
        Server.objects.get_or_create(
            name=ME,
            defaults={
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "database": connection.vendor,
                "channel_layer": layer_name(),
                "last_seen": now,
            },
        )


def unregister() -> None:
    Server.objects.filter(name=ME).delete()
