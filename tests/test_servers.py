"""The live-servers table (workers_app.servers) and who judges which worker."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess

import pytest
from django.db import connection, transaction
from django.utils import timezone

from tests.test_lifecycle import make_worker, queue, running_on
from workers_app import dispatch, liveness, servers
from workers_app.exceptions import ServerRefused
from workers_app.models import Server, Worker
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db


def _other(name: str = "elsewhere:4242", seen_ago: float = 0.0, **fields) -> Server:
    return Server.objects.create(
        name=name,
        hostname=fields.pop("hostname", "elsewhere"),
        pid=fields.pop("pid", 4242),
        address="10.0.0.2:8000",
        database="postgresql",
        channel_layer=fields.pop("channel_layer", "redis 127.0.0.1:6379/0 prefix scheduler"),
        last_seen=timezone.now() - dt.timedelta(seconds=seen_ago),
        **fields,
    )


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_it_enters_this_process_and_leaves_on_unregister():
    server = servers.register("127.0.0.1:8000")

    assert server.name.startswith(f"{socket.gethostname()}:{os.getpid()}:")
    assert (server.pid, server.address, server.host_key) == (
        os.getpid(),
        "127.0.0.1:8000",
        servers.HOST_KEY,
    )
    assert servers.HOST_KEY.count("/") >= 1
    assert (server.database, server.channel_layer) == (connection.vendor, servers.layer_name())
    assert servers.alive() == [server]
    servers.unregister()
    assert not Server.objects.exists()


def test_a_second_server_on_sqlite_is_refused_and_nothing_is_written(settings):
    settings.SCALE_OUT = False
    other = _other(seen_ago=2)

    with pytest.raises(ServerRefused) as refused:
        servers.register("127.0.0.1:8001")

    why = (
        "it runs on the SQLite file "
        if connection.vendor == "sqlite"
        else "it uses the in-memory channel layer (REDIS_URL is unset)"
    )
    assert str(refused.value).startswith(
        "another server process of this install is alive: server elsewhere:4242 (serving"
        f" 10.0.0.2:8000, last seen 2s ago). This one cannot start beside it: {why}"
    )
    assert list(Server.objects.all()) == [other]


def _on_redis(settings, prefix: str = "scheduler") -> str:
    """Settings as with REDIS_URL (nothing connects to it here); the layer's name."""
    settings.SCALE_OUT = True
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": "redis://10.0.0.9:6379/2"}], "prefix": prefix},
        }
    }
    return servers.layer_name()


def test_with_postgresql_and_redis_servers_start_side_by_side(settings):
    layer = _on_redis(settings)
    assert layer == "redis 10.0.0.9:6379/2 prefix scheduler"
    other = _other(channel_layer=layer)

    mine = servers.register("127.0.0.1:8001")

    assert set(servers.alive()) == {other, mine}
    assert mine.channel_layer == layer


@pytest.mark.parametrize(
    "theirs",
    ["in-memory", "redis 10.0.0.9:6379/2 prefix other", "redis 10.0.0.8:6379/2 prefix scheduler"],
)
def test_a_server_on_another_layer_than_the_live_ones_is_refused(settings, theirs):
    # One started without REDIS_URL (alone, so allowed), then one with it; or two
    # Redis setups apart: neither would reach the other's agents.
    _on_redis(settings)
    other = _other(channel_layer=theirs)

    with pytest.raises(ServerRefused) as refused:
        servers.register("127.0.0.1:8001")

    assert (
        "This one cannot start beside it: it uses the channel layer 'redis 10.0.0.9:6379/2"
        f" prefix scheduler', and elsewhere:4242 uses {theirs!r}: servers of one install must"
        " share one Redis, database number and SCHEDULER_REDIS_PREFIX."
    ) in str(refused.value)
    assert list(Server.objects.all()) == [other]


def test_a_silent_server_or_a_gone_process_on_this_host_is_dead_and_cleared(settings):
    layer = _on_redis(settings)
    _other("silent:1", seen_ago=servers.SILENT_AFTER_S + 1, channel_layer=layer)
    # Killed with SIGKILL a moment ago on this host: fresh row, no process.
    _other("ghost:2", host_key=servers.HOST_KEY, pid=_dead_pid(), channel_layer=layer)
    # The same host name, another pid namespace (a container): its pid means
    # nothing here, so its fresh row keeps it alive.
    _other(
        "container:3",
        hostname=socket.gethostname(),
        host_key="another-boot/pid:[4026531836]",
        pid=_dead_pid(),
        channel_layer=layer,
    )

    mine = servers.register("127.0.0.1:8000")

    assert sorted(s.name for s in Server.objects.all()) == sorted(["container:3", mine.name])


def test_the_service_touches_its_row_every_tick_and_puts_it_back_if_removed():
    servers.register("127.0.0.1:8000")
    Server.objects.update(last_seen=timezone.now() - dt.timedelta(minutes=5))
    service = SchedulerService()

    service.tick()
    [row] = Server.objects.all()
    assert timezone.now() - row.last_seen < dt.timedelta(seconds=5)

    Server.objects.all().delete()  # another server cleared us while we stalled
    service.tick()
    assert Server.objects.get().name == servers.ME


# --- who judges a silent worker ------------------------------------------------------


@pytest.fixture
def long_silent(settings, task):
    """A worker silent for longer than the lost timeout, with a running attempt."""
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    worker = make_worker(
        "quiet", last_heartbeat=timezone.now() - dt.timedelta(seconds=16), state="online"
    )
    return worker, running_on(worker, task)


def test_a_worker_connected_to_another_live_server_is_left_to_that_server(long_silent):
    worker, attempt = long_silent
    _other("busy:7", seen_ago=1)
    Worker.objects.filter(pk=worker.pk).update(server="busy:7", channel_name="specific.x!y")

    assert liveness.reap_lost() == []
    attempt.refresh_from_db()
    assert attempt.status == "running"


@pytest.mark.parametrize(
    "server",
    [
        "",  # not connected anywhere
        "gone:9",  # its server's row is gone
        "stalled:8",  # its server has been silent for as long as the worker
        servers.ME,  # ours
    ],
)
def test_a_worker_whose_server_is_not_another_live_one_is_reaped(long_silent, server):
    worker, attempt = long_silent
    _other("stalled:8", seen_ago=16)
    Worker.objects.filter(pk=worker.pk).update(server=server)

    assert liveness.reap_lost() == [worker.pk]
    attempt.refresh_from_db()
    assert (attempt.status, attempt.reason) == ("lost", "worker lost: no heartbeat for 15s")


def test_a_claim_needs_the_worker_online_as_the_database_says_at_that_moment(task):
    # This server's board read the worker online; another server has since reaped
    # it (or an operator drained it there): no assignment may go to it.
    worker = make_worker("elsewhere-reaped", capacity=2)
    [attempt] = queue(task)
    dispatch.board.invalidate()
    with transaction.atomic():
        dispatch.board.refresh()
    assert worker.pk in dispatch.board.workers
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.OFFLINE)
    dispatch.board.add_classes([attempt.labels_key])

    assert dispatch.dispatch(fresh=False) == []

    attempt.refresh_from_db()
    assert (attempt.status, attempt.worker_id) == ("queued", None)
    # Its board recounts that worker before the next pass, and then leaves it out.
    assert dispatch.dispatch(fresh=False) == []
    assert worker.pk not in dispatch.board.workers
