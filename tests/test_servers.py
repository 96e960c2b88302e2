"""The live-servers table (workers_app.servers) and who judges which worker."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess

import pytest
from django.utils import timezone

from tests.test_lifecycle import make_worker, running_on
from workers_app import liveness, servers
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
        channel_layer="redis",
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

    assert (server.name, server.pid, server.address) == (
        f"{socket.gethostname()}:{os.getpid()}",
        os.getpid(),
        "127.0.0.1:8000",
    )
    assert (server.database, server.channel_layer) == ("sqlite", "in-memory")
    assert servers.alive() == [server]
    servers.unregister()
    assert not Server.objects.exists()


def test_a_second_server_on_sqlite_is_refused_and_nothing_is_written(settings):
    settings.SCALE_OUT = False
    other = _other(seen_ago=2)

    with pytest.raises(ServerRefused) as refused:
        servers.register("127.0.0.1:8001")

    assert str(refused.value).startswith(
        "another server process of this install is alive: server elsewhere:4242 (serving"
        " 10.0.0.2:8000, last seen 2s ago). This one cannot start beside it: it runs on the"
        " SQLite file "
    )
    assert list(Server.objects.all()) == [other]


def test_with_postgresql_and_redis_servers_start_side_by_side(settings):
    settings.SCALE_OUT = True
    other = _other()

    mine = servers.register("127.0.0.1:8001")

    assert set(servers.alive()) == {other, mine}


def test_a_silent_server_or_a_gone_process_on_this_host_is_dead_and_cleared(settings):
    settings.SCALE_OUT = False
    _other("silent:1", seen_ago=servers.SILENT_AFTER_S + 1)
    # Killed with SIGKILL a moment ago on this host: fresh row, no process.
    _other("ghost:2", hostname=socket.gethostname(), pid=_dead_pid())

    mine = servers.register("127.0.0.1:8000")  # not refused

    assert list(Server.objects.all()) == [mine]


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
