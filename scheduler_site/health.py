"""/metrics, /healthz and /readyz: for Prometheus, load balancers and systemd.

None of them needs a login: a scraper or a probe has no session. /healthz
and /readyz say nothing secret; /metrics (task names, fleet size) answers
loopback addresses only, or with SCHEDULER_METRICS_TOKEN set, requests that
bear it, from anywhere, and no others. All three skip the host check and the
https redirect (scheduler_site.middleware.Probes): they are reached by a
server's own address, over plain http, inside the network.

/readyz runs each check in a thread of its own and waits CHECK_TIMEOUT_S for
it: a database or Redis that does not answer (a black-holed host, a lock)
must make the probe fail in bounded time, not hang it. A check still stuck
from an earlier probe is reported as such instead of being started again, so
a dead database never piles up threads.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST

from scheduler_site.clientip import client_ip
from scheduler_site.exceptions import NotReady
from scheduler_site.metrics import exposition

# How long /readyz waits for each check (they run at once, side by side).
CHECK_TIMEOUT_S = 3.0


# --- /healthz ------------------------------------------------------------------


@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """The process is up and answers HTTP; nothing else is looked at (liveness)."""
    return HttpResponse("ok\n", content_type="text/plain; charset=utf-8")


# --- /metrics ------------------------------------------------------------------


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    refusal = metrics_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


def metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    """Why this request may not read /metrics (401 or 403, said in plain text), or None."""
    token = settings.SCHEDULER_METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _refused(
                401, "/metrics needs the header Authorization: Bearer <SCHEDULER_METRICS_TOKEN>"
            )
        # Constant time: how much of a guess was right must not show in the delay.
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _refused(401, "/metrics: wrong bearer token")
        return None
    address = client_ip(request)
    if not is_loopback(address):
        return _refused(
            403,
            f"/metrics answers loopback addresses only, and this request came from {address};"
            " set SCHEDULER_METRICS_TOKEN on the server to scrape it from elsewhere with"
            " Authorization: Bearer <token>",
        )
    return None


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def _refused(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


# --- /readyz -------------------------------------------------------------------


@never_cache
@require_safe
def readyz(request: HttpRequest) -> HttpResponse:
    """200 with every check "ok", or 503 with what failed and why (readiness)."""
    started = {name: _start(name, check) for name, check in CHECKS.items()}
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    results = {name: _outcome(name, future, deadline) for name, future in started.items()}
    ready = all(value == "ok" for value in results.values())
    return JsonResponse(results, status=200 if ready else 503)


def check_database() -> None:
    """A read of a table every migrated database has (a SELECT of nothing would
    pass on the empty database SQLite makes where a moved file was)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM django_migrations LIMIT 1")
            cursor.fetchall()
    finally:
        # This thread's own connection: never kept between probes.
        connection.close()


def check_channel_layer() -> None:
    """Redis answers a PING (the server's agents are reached through it); the
    in-memory layer carries a message to a private channel and back."""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S,
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    async_to_sync(_round_trip)()


async def _round_trip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel("readyz")
    await layer.send(channel, {"type": "readyz.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "readyz.ping":
        raise NotReady(f"the channel layer handed back {message!r}")


def check_service() -> None:
    """This process's scheduler service finished a tick lately."""
    from workers_app import service

    age = service.since_last_tick()
    if age is None:
        raise NotReady(
            "the scheduler service has not finished a tick in this process (starting, or not"
            " running here)"
        )
    if age > settings.SCHEDULER_READY_SERVICE_S:
        raise NotReady(
            f"the scheduler service last finished a tick {age:.1f}s ago"
            f" (more than SCHEDULER_READY_SERVICE_S={settings.SCHEDULER_READY_SERVICE_S:g})"
        )


CHECKS = {
    "database": check_database,
    "channel_layer": check_channel_layer,
    "scheduler_service": check_service,
}

_pool = ThreadPoolExecutor(max_workers=2 * len(CHECKS), thread_name_prefix="readyz")
_lock = threading.Lock()
# A check's run that outlived its probe: (future, when it started).
_stuck: dict[str, tuple[Future, float]] = {}


def _start(name: str, check) -> Future | str:
    with _lock:
        earlier = _stuck.get(name)
        if earlier is not None and not earlier[0].done():
            waited = time.monotonic() - earlier[1]
            return f"no answer: the check started {waited:.0f}s ago still waits"
        future = _pool.submit(check)
        _stuck[name] = (future, time.monotonic())
        return future


def _outcome(name: str, future: Future | str, deadline: float) -> str:
    if isinstance(future, str):
        return future
    try:
        future.result(timeout=max(deadline - time.monotonic(), 0))
    except FutureTimeout:
        return f"no answer within {CHECK_TIMEOUT_S:g}s"
    except NotReady as exc:
        return str(exc)
    except Exception as exc:
        # The driver's words (OperationalError: ... database "x" does not exist).
        return f"{type(exc).__name__}: {exc}".strip()[:500]
    return "ok"
