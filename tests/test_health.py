"""/metrics, /healthz and /readyz (scheduler_site.health).

The metrics are read the way Prometheus reads them, through prometheus_client's
own parser, after runs driven through the real lifecycle (in this process) or
through a real server and agent (end to end). Counters and histograms belong
to the process: in-process tests give their tasks names of their own, so a
series' value is exactly what the test did. /readyz is failed for real: the
server's database dropped or moved away, its service held up by a lock.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import sys
import time
import uuid

import pytest
import requests
from channels.testing import WebsocketCommunicator
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from scheduler_site.asgi import application
from scheduler_site.envconfig import env_token
from tasks_app import lifecycle
from tasks_app.models import Attempt, Task
from tests import engines
from tests.harness import wait_for
from tests.test_consumer import TIMEOUT, barrier, hello_frame
from tests.test_lifecycle import make_worker, result
from workers_app.models import Worker
from workers_app.service import SchedulerService

TOKEN = "metrics-token-0123456789abcdef"


# --- reading /metrics ------------------------------------------------------------


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: Client | None = None, **headers) -> dict[tuple[str, tuple], float]:
    response = (client or local()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return parse(response.content.decode())


def local() -> Client:
    return Client(HTTP_HOST="localhost", REMOTE_ADDR="127.0.0.1")


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def finish_run(task: Task, worker: Worker, exit_code: int) -> None:
    """One run of the task, through trigger, claim, start and result, as the writer applies them."""
    attempt = lifecycle.trigger_run(task).attempts.get()
    attempt.refresh_from_db()
    if attempt.status == Attempt.Status.QUEUED:
        # Dispatch, woken after the trigger's commit, may have given it out already.
        assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 4242)
    assert lifecycle.finish(worker.pk, attempt.pk, result(exit_code)) is lifecycle.Outcome.STORED


# --- counters and histograms, observed by the lifecycle ---------------------------


@pytest.mark.django_db(transaction=True)  # observed after commit, as in a server
def test_runs_finished_count_each_run_once_by_task_and_status():
    name = f"x-{uuid.uuid4().hex[:8]}"
    task = Task.objects.create(name=name, command="true", max_retries=0)
    other = Task.objects.create(name=f"{name}-other", command="true")
    worker = make_worker("node-m", capacity=4)
    before = scrape()

    for exit_code in (0, 0, 1, 0):
        finish_run(task, worker, exit_code)
    finish_run(other, worker, 0)

    after = scrape()
    finished = "scheduler_runs_finished_total"
    assert value(after, finished, task=name, status="succeeded") == 3
    assert value(after, finished, task=name, status="failed") == 1
    assert value(after, finished, task=f"{name}-other", status="succeeded") == 1
    # Nothing of this task counted as cancelled (other tests of this process may have).
    assert not [
        key
        for key in after
        if key[0] == finished and {("status", "cancelled"), ("task", name)} <= set(key[1])
    ]

    def grew(sample: str, **labels) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    # Every start observed once; each took the milliseconds of this test, far under a minute.
    assert grew("scheduler_start_latency_seconds_count") == 5
    assert grew("scheduler_start_latency_seconds_bucket", le="60.0") == 5
    # Each observed once, with its status; each lasted the milliseconds of this test.
    assert grew("scheduler_run_duration_seconds_count", status="succeeded") == 4
    assert grew("scheduler_run_duration_seconds_count", status="failed") == 1
    assert grew("scheduler_run_duration_seconds_bucket", status="succeeded", le="60.0") == 4
    assert 0 <= grew("scheduler_run_duration_seconds_sum", status="succeeded") < 4


@pytest.mark.django_db(transaction=True)
def test_a_lost_attempt_and_the_retries_are_counted():
    task = Task.objects.create(name=f"r-{uuid.uuid4().hex[:8]}", command="true", max_retries=1)
    before = scrape()
    lost = lifecycle.trigger_run(task).attempts.get()
    failed = lifecycle.trigger_run(task).attempts.get()
    worker = make_worker("node-l", capacity=4)  # after the triggers: nothing dispatched yet
    assert lifecycle.assign(lost.pk, worker.pk, worker.name)
    assert lifecycle.assign(failed.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, failed.pk, None, 1)

    assert lifecycle.mark_lost(worker.pk, "worker went silent", keep=[failed.pk]) == [lost.pk]
    lifecycle.finish(worker.pk, failed.pk, result(3))

    after = scrape()
    assert Attempt.objects.filter(try_number=2).count() == 2  # both retried for real
    assert (
        value(after, "scheduler_attempts_lost_total")
        - value(before, "scheduler_attempts_lost_total")
        == 1
    )
    for ended in ("lost", "failed"):
        label = {"after": ended}
        grown = value(after, "scheduler_attempts_retried_total", **label) - value(
            before, "scheduler_attempts_retried_total", **label
        )
        assert grown == 1, ended
    # Retried, so neither run is finished.
    assert not value(after, "scheduler_runs_finished_total", task=task.name, status="failed")


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_batch_counts_nothing():
    from django.db import transaction

    task = Task.objects.create(name=f"rb-{uuid.uuid4().hex[:8]}", command="true")
    attempt = lifecycle.trigger_run(task).attempts.get()
    worker = make_worker("node-rb")
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    lifecycle.mark_started(worker.pk, attempt.pk, None, 1)

    with pytest.raises(RuntimeError), transaction.atomic():
        lifecycle.finish(worker.pk, attempt.pk, result(0))
        raise RuntimeError("the batch failed after the result was applied")

    assert not value(scrape(), "scheduler_runs_finished_total", task=task.name, status="succeeded")
    lifecycle.finish(worker.pk, attempt.pk, result(0))
    assert value(scrape(), "scheduler_runs_finished_total", task=task.name, status="succeeded") == 1


# --- gauges of the whole install, read at scrape time ------------------------------


@pytest.mark.django_db(transaction=True)
def test_queue_depth_and_the_age_of_its_oldest_ready_attempt():
    task = Task.objects.create(name="queued", command="true")
    assert value(scrape(), "scheduler_queue_depth") == 0
    assert value(scrape(), "scheduler_queue_oldest_age_seconds") == 0

    for _ in range(7):
        lifecycle.trigger_run(task)
    # A delayed run is queued too, but not ready: it is nobody's wait yet.
    delayed = lifecycle.trigger_runs(
        [lifecycle.TriggerRequest(task.pk, run_at=timezone.now() + dt.timedelta(hours=1))]
    )[0][0]
    labelled = Task.objects.create(name="gpu-only", command="true", labels=["gpu"])
    oldest = lifecycle.trigger_run(labelled).attempts.get()
    # That one has waited 90 s: as if queued then (the queue's order moves with it).
    long_ago = timezone.now() - dt.timedelta(seconds=90)
    Attempt.objects.filter(pk=oldest.pk).update(ready_at=long_ago, queue_at=long_ago)

    samples = scrape()

    assert delayed.status == "queued"
    assert value(samples, "scheduler_queue_depth") == 9
    assert 90 <= value(samples, "scheduler_queue_oldest_age_seconds") < 100
    assert value(samples, "scheduler_metrics_database_up") == 1


@pytest.mark.django_db(transaction=True)
def test_workers_by_state_and_their_slots():
    task = Task.objects.create(name="busy", command="true")
    first, second = (lifecycle.trigger_run(task).attempts.get() for _ in range(2))
    online = make_worker("on-1", capacity=3)
    make_worker("on-2", capacity=4, requested_capacity=1)  # its agent asks for one slot
    make_worker("draining", capacity=5, state=Worker.State.DRAINING)
    make_worker("off", capacity=6, state=Worker.State.OFFLINE)
    make_worker("new", capacity=7, state=Worker.State.PENDING, approved_at=None)
    for attempt in (first, second):
        assert lifecycle.assign(attempt.pk, online.pk, online.name)
    lifecycle.mark_started(online.pk, second.pk, None, 1)

    samples = scrape()

    states = {s: value(samples, "scheduler_workers", state=s) for s in Worker.State.values}
    assert states == {"pending": 1, "online": 2, "offline": 1, "draining": 1, "disabled": 0}
    assert value(samples, "scheduler_slots_capacity") == 3 + 1
    assert value(samples, "scheduler_slots_in_use") == 2  # one assigned, one running


# --- the agent consumer: frames and sockets -----------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_frames_are_counted_by_type_and_sockets_while_connected(worker, worker_credential):
    from asgiref.sync import sync_to_async

    before = await sync_to_async(scrape)()
    comm = WebsocketCommunicator(
        application,
        "/ws/agent/",
        headers=[(b"authorization", b"Bearer " + worker_credential.encode())],
    )
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    await comm.send_json_to(hello_frame())
    await comm.receive_json_from(timeout=TIMEOUT)  # the welcome
    await comm.send_json_to({"type": "heartbeat"})
    await comm.send_json_to({"type": "heartbeat"})
    await barrier(comm)  # an unknown frame type: refused

    during = await sync_to_async(scrape)()
    await comm.disconnect(timeout=TIMEOUT)
    after = await sync_to_async(scrape)()

    def grew(samples, kind: str) -> float:
        name = "scheduler_agent_frames_received_total"
        return value(samples, name, type=kind) - value(before, name, type=kind)

    assert [grew(during, k) for k in ("hello", "heartbeat", "invalid", "finished")] == [1, 2, 1, 0]
    sockets = "scheduler_agent_sockets"
    assert value(during, sockets) - value(before, sockets) == 1
    assert value(after, sockets) == value(before, sockets)


# --- who may read /metrics --------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_loopback_addresses_read_metrics_without_a_token(address):
    response = Client(HTTP_HOST="localhost", REMOTE_ADDR=address).get("/metrics")

    assert response.status_code == 200
    assert "scheduler_queue_depth" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("address", ["10.0.0.7", "192.0.2.1", "2001:db8::1", ""])
def test_other_addresses_are_refused_without_a_token(address):
    response = Client(HTTP_HOST="localhost", REMOTE_ADDR=address).get("/metrics")

    assert response.status_code == 403
    text = response.content.decode()
    assert "loopback addresses only" in text and "SCHEDULER_METRICS_TOKEN" in text
    assert "scheduler_" not in text


@pytest.mark.django_db
def test_behind_a_proxy_the_client_address_is_the_proxys_header(settings):
    settings.SCHEDULER_CLIENT_IP_HEADER = "HTTP_X_REAL_IP"
    proxied = Client(HTTP_HOST="localhost", REMOTE_ADDR="127.0.0.1")

    outside = proxied.get("/metrics", HTTP_X_REAL_IP="203.0.113.9")
    inside = proxied.get("/metrics", HTTP_X_REAL_IP="127.0.0.1")

    assert outside.status_code == 403 and "203.0.113.9" in outside.content.decode()
    assert inside.status_code == 200


@pytest.mark.django_db
def test_with_a_token_set_only_requests_bearing_it_read_metrics(settings):
    settings.SCHEDULER_METRICS_TOKEN = TOKEN
    remote = Client(HTTP_HOST="localhost", REMOTE_ADDR="10.0.0.7")

    missing = local().get("/metrics")  # loopback is no longer enough
    wrong = remote.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN[:-1]}x")
    basic = remote.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}")
    right = remote.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    lower = local().get("/metrics", HTTP_AUTHORIZATION=f"bearer {TOKEN}")

    for refused in (missing, wrong, basic):
        assert refused.status_code == 401
        assert refused["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert "scheduler_" not in refused.content.decode()
    assert "Authorization: Bearer" in missing.content.decode()
    assert wrong.content.decode() == "/metrics: wrong bearer token\n"
    assert right.status_code == 200 and "scheduler_queue_depth" in right.content.decode()
    assert lower.status_code == 200


def test_the_token_setting_is_read_strictly(monkeypatch, tmp_path):
    monkeypatch.delenv("SCHEDULER_METRICS_TOKEN", raising=False)
    assert env_token("SCHEDULER_METRICS_TOKEN", min_length=16, default_text="unset") == ""
    monkeypatch.setenv("SCHEDULER_METRICS_TOKEN", "short")
    with pytest.raises(ImproperlyConfigured, match="at least 16 characters, not 5"):
        env_token("SCHEDULER_METRICS_TOKEN", min_length=16, default_text="unset")
    monkeypatch.setenv("SCHEDULER_METRICS_TOKEN", "has a space in it, long enough")
    with pytest.raises(ImproperlyConfigured, match="no spaces"):
        env_token("SCHEDULER_METRICS_TOKEN", min_length=16, default_text="unset")
    monkeypatch.delenv("SCHEDULER_METRICS_TOKEN")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    monkeypatch.setenv("SCHEDULER_METRICS_TOKEN_FILE", str(secret))
    assert env_token("SCHEDULER_METRICS_TOKEN", min_length=16, default_text="unset") == TOKEN


@pytest.mark.django_db
def test_the_probes_and_metrics_are_not_redirected_to_https(settings):
    settings.SECURE_SSL_REDIRECT = True
    plain = Client(HTTP_HOST="localhost", REMOTE_ADDR="127.0.0.1")

    assert plain.get("/tasks/").status_code == 301  # everything else is
    assert plain.get("/healthz").status_code == 200
    assert plain.get("/metrics").status_code == 200
    assert plain.get("/readyz").status_code in (200, 503)  # answered, not redirected


@pytest.mark.django_db
def test_a_probe_by_the_servers_own_address_passes_the_host_check():
    # A load balancer or Prometheus names the server by its address, which
    # SCHEDULER_ALLOWED_HOSTS (scheduler.example.com) does not list.
    by_address = Client(HTTP_HOST="10.0.0.5:8001", REMOTE_ADDR="127.0.0.1")

    assert by_address.get("/tasks/").status_code == 400  # Django's host check
    assert by_address.get("/healthz").content == b"ok\n"
    assert "scheduler_queue_depth" in by_address.get("/metrics").content.decode()
    assert by_address.get("/readyz").json()["database"] == "ok"


# --- /healthz and /readyz ----------------------------------------------------------


def test_healthz_says_ok_without_a_login_or_the_database():
    response = local().get("/healthz")

    assert (response.status_code, response.content) == (200, b"ok\n")
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_readyz_fails_in_a_process_whose_service_never_ticked(monkeypatch):
    from workers_app import service

    monkeypatch.setattr(service, "last_tick", None)  # a process that has just started

    response = local().get("/readyz")

    assert response.status_code == 503
    assert response.json() == {
        "database": "ok",
        "channel_layer": "ok",
        "scheduler_service": "the scheduler service has not finished a tick in this process"
        " (starting, or not running here)",
    }


@pytest.mark.django_db(transaction=True)
def test_readyz_is_ok_once_the_service_ticked_and_fails_when_it_stops(settings):
    SchedulerService().tick()

    ready = local().get("/readyz")

    assert ready.status_code == 200, ready.content
    assert ready.json() == {"database": "ok", "channel_layer": "ok", "scheduler_service": "ok"}

    settings.SCHEDULER_READY_SERVICE_S = 0.2
    time.sleep(0.3)
    stale = local().get("/readyz")

    assert stale.status_code == 503
    body = stale.json()
    assert body["database"] == "ok" and body["channel_layer"] == "ok"
    assert body["scheduler_service"].startswith("the scheduler service last finished a tick")
    assert "SCHEDULER_READY_SERVICE_S=0.2" in body["scheduler_service"]


# --- end to end: a real server and agent ---------------------------------------------


@pytest.mark.e2e
def test_a_real_servers_metrics_after_known_runs(master, start_agent):
    start_agent("agent-1", capacity=2)
    task = master.create_task(name="x", command="true", max_retries=0)
    other = master.create_task(
        name="y", command=f"{sys.executable} -c 'raise SystemExit(2)'", max_retries=0
    )
    runs = [master.trigger(task["id"]) for _ in range(3)] + [master.trigger(other["id"])]
    bad = master.create_task(name="x-bad", command="false", max_retries=0)
    runs.append(master.trigger(bad["id"]))
    final = [master.wait_final(run["id"])["status"] for run in runs]
    assert final == ["succeeded"] * 3 + ["failed", "failed"]

    samples = parse(requests.get(f"{master.url}/metrics", timeout=10).text)

    finished = "scheduler_runs_finished_total"
    assert value(samples, finished, task="x", status="succeeded") == 3
    assert value(samples, finished, task="y", status="failed") == 1
    assert value(samples, finished, task="x-bad", status="failed") == 1
    assert value(samples, "scheduler_start_latency_seconds_count") == 5
    assert value(samples, "scheduler_run_duration_seconds_count", status="succeeded") == 3
    assert value(samples, "scheduler_run_duration_seconds_count", status="failed") == 2
    assert value(samples, "scheduler_attempts_lost_total") == 0
    frames = "scheduler_agent_frames_received_total"
    assert value(samples, frames, type="hello") == 1
    assert value(samples, frames, type="finished") == 5
    assert value(samples, frames, type="invalid") == 0
    assert value(samples, "scheduler_agent_sockets") == 1
    assert value(samples, "scheduler_workers", state="online") == 1
    assert value(samples, "scheduler_slots_capacity") == 2
    assert value(samples, "scheduler_slots_in_use") == 0
    assert value(samples, "scheduler_queue_depth") == 0


def _readyz(master) -> tuple[int, dict]:
    response = requests.get(f"{master.url}/readyz", timeout=10)
    return response.status_code, response.json()


@pytest.mark.e2e
def test_readyz_fails_when_the_servers_database_is_gone(master):
    wait_for(lambda: _readyz(master)[0] == 200, what="the server ready")

    if master.owned and master.owned.database_url:
        # PostgreSQL: the server's own database, dropped under it.
        engines.drop_database(master.owned.database_url)
        gone = "does not exist"
    else:
        # SQLite: the file moved away (new connections find an empty database).
        aside = master.data_dir / "moved"
        aside.mkdir()
        for path in master.data_dir.glob("db.sqlite3*"):
            shutil.move(path, aside / path.name)
        gone = "no such table"

    status, body = _readyz(master)

    assert status == 503
    assert gone in body["database"], body
    assert body["channel_layer"] == "ok"
    assert requests.get(f"{master.url}/healthz", timeout=10).text == "ok\n"


@pytest.mark.e2e
@pytest.mark.master_env(SCHEDULER_READY_SERVICE_S="1.5")
def test_readyz_fails_while_the_service_cannot_tick_and_recovers(master):
    wait_for(lambda: _readyz(master)[0] == 200, what="the server ready")

    # The service's first duty writes the server's row: a lock held by someone
    # else holds the whole tick up (reads, and so the database check, go on).
    if master.owned and master.owned.database_url:
        import psycopg

        holder = psycopg.connect(engines.libpq(master.owned.database_url))
        holder.execute("LOCK TABLE workers_app_server IN ACCESS EXCLUSIVE MODE")
    else:
        holder = sqlite3.connect(master.data_dir / "db.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        status, body = wait_for(
            lambda: (r := _readyz(master))[0] == 503 and r, timeout=15, what="readyz to fail"
        )
        assert body["scheduler_service"].startswith("the scheduler service last finished a tick")
        assert body["database"] == "ok"
    finally:
        holder.close()  # its transaction ends, and with it the lock

    wait_for(lambda: _readyz(master)[0] == 200, timeout=30, what="readyz ok again")
