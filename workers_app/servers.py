"""The table of live server processes: who else serves this install.

Every `serve` process has a row (Server) that it writes when it starts,
touches on every tick of its service and deletes when it stops. A row is
dead when it has not been touched for SILENT_AFTER_S, or when its process
no longer exists on this very host and pid namespace (a server killed with
SIGKILL and restarted at once must not be refused by its own ghost).

Several servers are correct only on PostgreSQL + Redis: with SQLite two
processes would share one file's write lock and each its own dispatch, and
with the in-memory channel layer a server cannot reach the agents connected
to another. So a server that finds another one alive refuses to start
unless settings.SCALE_OUT, and all of them name the same Redis, database
number and prefix (the others' rows say which they use, so a server started
beside them with other settings is refused too); the check and the insert are one transaction
(SQLite's IMMEDIATE lock, or an advisory lock on PostgreSQL), so two
servers starting at once cannot both pass it.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from workers_app.exceptions import ServerRefused
from workers_app.models import Server

# A server touches its row every tick (SCHEDULER_TICK_S, 1 s by default).
SILENT_AFTER_S = 15.0
# pg_advisory_xact_lock key of the start-up check ("sched" in ASCII).
_START_LOCK = 0x7363686564


def _host_key() -> str:
    """This kernel's boot and this pid namespace: where our pids mean something
    (containers may share a host name and not their pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"[:100]


HOST_KEY = _host_key()
# Unique even where two hosts share a name and pids (containers).
ME = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def is_alive(server: Server, now: dt.datetime) -> bool:
    if HOST_KEY and server.host_key == HOST_KEY and not _process_exists(server.pid):
        return False  # killed on this very host (and namespace): gone, whatever its row says
    return now - server.last_seen < dt.timedelta(seconds=SILENT_AFTER_S)


def alive(now: dt.datetime | None = None) -> list[Server]:
    """The live server processes, this one included once registered."""
    now = now or timezone.now()
    return [s for s in Server.objects.all() if is_alive(s, now)]


def layer_name() -> str:
    """The channel layer this process uses, as servers of one install must share it."""
    layer = settings.CHANNEL_LAYERS["default"]
    if "redis" not in layer["BACKEND"].lower():
        return "in-memory"
    config = layer["CONFIG"]
    parts = urlsplit(config["hosts"][0]["address"])
    where = f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
    return f"redis {where} prefix {config['prefix']}"[:300]


def _shared() -> bool:
    return settings.SCALE_OUT


def _refusal(others: list[Server]) -> str | None:
    """Why this process may not serve beside these live servers, or None."""
    if not others:
        return None
    other = others[0]
    seen = (timezone.now() - other.last_seen).total_seconds()
    who = (
        f"server {other.name} (serving {other.address or '?'}, last seen {seen:.0f}s ago)"
        if len(others) == 1
        else f"{len(others)} servers ({', '.join(o.name for o in others)})"
    )
    if not _shared() and connection.vendor == "sqlite":
        why = (
            f"it runs on the SQLite file {settings.DATABASES['default']['NAME']}, which only one"
            " server process may use"
        )
    elif not _shared():
        why = (
            "it uses the in-memory channel layer (REDIS_URL is unset), which cannot reach the"
            " agents connected to another server process"
        )
    else:
        # Both ends must share the layer: a server on another Redis (or prefix,
        # or none) would never hear of, nor reach, the agents of the others.
        mine = layer_name()
        apart = [o for o in others if o.channel_layer != mine]
        if not apart:
            return None
        other = apart[0]
        why = (
            f"it uses the channel layer {mine!r}, and {other.name} uses {other.channel_layer!r}:"
            " servers of one install must share one Redis, database number and"
            " SCHEDULER_REDIS_PREFIX"
        )
        who = f"server {other.name} (serving {other.address or '?'})"
    return (
        f"another server process of this install is alive: {who}. This one cannot start beside"
        f" it: {why}. Stop the other one, or run every server with DATABASE_URL (PostgreSQL)"
        " and the same REDIS_URL (Redis)."
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
        dead = [s.pk for s in rows if not is_alive(s, now)]
        Server.objects.filter(pk__in=dead).delete()
        refusal = _refusal([s for s in rows if s.pk not in dead])
        if refusal:
            raise ServerRefused(refusal)
        server, _ = Server.objects.update_or_create(
            name=ME,
            defaults={
                "hostname": socket.gethostname(),
                "host_key": HOST_KEY,
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
                "host_key": HOST_KEY,
                "pid": os.getpid(),
                "database": connection.vendor,
                "channel_layer": layer_name(),
                "last_seen": now,
            },
        )


def unregister() -> None:
    Server.objects.filter(name=ME).delete()
