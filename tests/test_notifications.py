"""Notifications: a task's webhooks and e-mail told of failures, recoveries and
(when asked) successes, once each, signed, retried; the stuck-queue alert;
the API's and form's checks; the delivery log on the task page.

Webhooks go to a real HTTP server on 127.0.0.1 that the test starts; time is
passed to the duties (`now`), so a retry's backoff is crossed without waiting.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.urls import reverse
from django.utils import timezone

from tasks_app import events, notify
from tasks_app.models import Attempt, Delivery, Event, NotifyCursor, Run, Task
from tests.test_routing import make_worker
from workers_app import stuck
from workers_app.models import StuckQueue
from workers_app.service import SchedulerService

pytestmark = pytest.mark.django_db

SECRET = "hook-secret-9f2c"


class Receiver:
    """A webhook receiver: records each request's headers and raw body, and
    answers with the next of `codes` (then 200)."""

    def __init__(self, codes=(), hold: threading.Event | None = None):
        self.codes = list(codes)
        self.hold = hold  # while set up and not set, each request waits (a slow receiver)
        self.requests: list[tuple[str, dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hold is not None:
                    receiver.hold.wait(10)
                receiver.requests.append((self.path, dict(self.headers), raw))
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(codes=(), hold=None):
        made.append(Receiver(codes, hold))
        return made[-1]

    yield make
    for one in made:
        one.close()


def verified(secret: str, headers: dict, raw: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Scheduler-Signature"], expected)


def hooked_task(name="nightly", hooks=(), emails=()) -> Task:
    task = Task(name=name, command="true", notify_emails=list(emails))
    task.set_webhooks(list(hooks))
    task.save()
    return task


def finish(task: Task, status: str, *, reason: str = "", at=None) -> Run:
    """A run of the task that ended with `status` (its attempt too), and its
    run.finished event."""
    at = at or timezone.now()
    run = Run.objects.create(
        task=task,
        task_name=task.name,
        definition=task.definition(),
        status=status,
        reason=reason,
        created_at=at - dt.timedelta(seconds=5),
        started_at=at - dt.timedelta(seconds=4),
        finished_at=at,
    )
    attempt_status = status if status in Attempt.Status.values else Attempt.Status.CANCELLED
    Attempt.objects.create(
        run=run,
        status=attempt_status,
        exit_code={"succeeded": 0, "failed": 1}.get(status),
        started_at=run.started_at,
        finished_at=at,
    )
    events.record(
        events.RUN_FINISHED,
        run_id=run.pk,
        task_id=task.pk,
        status=status,
        reason=reason,
        duration_s=4.0,
    )
    return run


def kinds(task: Task) -> list[tuple[int, str, str]]:
    return list(
        Delivery.objects.filter(task_id=task.pk)
        .order_by("run_id", "target")
        .values_list("run_id", "kind", "target")
    )


# --- webhooks ----------------------------------------------------------------------


def test_it_posts_a_signed_json_body_to_the_webhook_of_a_failed_run(receiver, settings):
    settings.SCHEDULER_PUBLIC_URL = "https://sched.example"
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    run = finish(task, Run.Status.FAILED, reason="exit code 3")

    assert notify.plan() == 1
    assert notify.send_now() == 1

    [(path, headers, raw)] = hook.requests
    assert path == "/hook"
    assert headers["Content-Type"] == "application/json"
    assert verified(SECRET, headers, raw)
    assert not verified("another secret", headers, raw)
    body = json.loads(raw)
    assert body["event"] == "failure"
    assert body["task"] == {"id": task.pk, "name": "nightly"}
    assert body["run"] == {
        "id": run.pk,
        "status": "failed",
        "reason": "exit code 3",
        "trigger": "manual",
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat(),
        "duration_s": 4.0,
        "url": f"https://sched.example/runs/{run.pk}/",
    }
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("sent", 1, 200)
    assert delivery.sent_at is not None


def test_it_retries_after_a_500_with_backoff_then_records_the_success(receiver, settings):
    settings.SCHEDULER_NOTIFY_BACKOFF_S = 30.0
    hook = receiver(codes=[500])
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.FAILED)
    notify.plan()
    now = timezone.now()

    assert notify.send_now(now) == 1
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("pending", 1, 500)
    assert delivery.last_error.startswith("HTTP 500")
    assert delivery.next_try_at == now + dt.timedelta(seconds=30)

    # Not before its backoff has passed.
    assert notify.send_now(now + dt.timedelta(seconds=29)) == 0
    assert len(hook.requests) == 1

    assert notify.send_now(now + dt.timedelta(seconds=31)) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("sent", 2, 200)
    assert len(hook.requests) == 2
    # The same body, signed the same, both times.
    assert hook.requests[0][2] == hook.requests[1][2]
    assert all(verified(SECRET, headers, raw) for _, headers, raw in hook.requests)


def test_it_gives_up_after_the_last_try_and_at_once_on_a_4xx(receiver, settings):
    settings.SCHEDULER_NOTIFY_TRIES = 2
    down = receiver(codes=[503, 503, 503])
    gone = receiver(codes=[404])
    task = hooked_task(
        hooks=[
            {"url": down.url, "events": ["failure"], "secret": SECRET},
            {"url": gone.url, "events": ["failure"], "secret": SECRET},
        ]
    )
    finish(task, Run.Status.FAILED)
    notify.plan()
    now = timezone.now()
    notify.send_now(now)
    notify.send_now(now + dt.timedelta(hours=1))

    by_target = {d.target: d for d in Delivery.objects.all()}
    assert (by_target[down.url].status, by_target[down.url].attempts) == ("failed", 2)
    assert by_target[down.url].response_code == 503
    assert (by_target[gone.url].status, by_target[gone.url].attempts) == ("failed", 1)
    assert by_target[gone.url].last_error.startswith("HTTP 404")
    assert len(down.requests) == 2 and len(gone.requests) == 1


def test_it_retries_a_receiver_that_refuses_connections(settings):
    # A port nobody listens on: a network error, tried again later.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    task = hooked_task(hooks=[{"url": url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.FAILED)
    notify.plan()
    notify.send_now()

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("pending", 1, None)
    assert "ConnectionError" in delivery.last_error


# --- what is sent, once -------------------------------------------------------------


def run_to_the_end(task: Task, worker, exit_code: int) -> Run:
    """A run through the real lifecycle: triggered, assigned, started, finished."""
    from tasks_app import lifecycle
    from tests.test_lifecycle import result

    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1)
    assert lifecycle.finish(worker.pk, attempt.pk, result(exit_code)) is lifecycle.Outcome.STORED
    run.refresh_from_db()
    return run


def test_runs_ended_by_the_lifecycle_are_notified_from_its_events(receiver, worker):
    hook = receiver()
    task = hooked_task(
        hooks=[{"url": hook.url, "events": ["failure", "recovery"], "secret": SECRET}]
    )
    failed = run_to_the_end(task, worker, 3)
    recovered = run_to_the_end(task, worker, 0)
    assert (failed.status, recovered.status) == ("failed", "succeeded")

    notify.plan()
    notify.send_now()

    assert kinds(task) == [(failed.pk, "failure", hook.url), (recovered.pk, "recovery", hook.url)]
    bodies = [json.loads(raw) for _, _, raw in hook.requests]
    assert [(b["event"], b["run"]["id"], b["run"]["status"]) for b in bodies] == [
        ("failure", failed.pk, "failed"),
        ("recovery", recovered.pk, "succeeded"),
    ]
    assert bodies[0]["run"]["reason"] == failed.reason != ""


def test_it_plans_each_failure_once_however_often_and_by_how_many_servers(receiver):
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    run = finish(task, Run.Status.FAILED)
    one, other = SchedulerService(), SchedulerService()

    assert one.plan_notifications()
    # The other server, behind: its cursor is the database's; and even from
    # scratch its plan adds nothing.
    NotifyCursor.objects.update(last_event_id=0)
    other.plan_notifications()
    one.plan_notifications()

    assert kinds(task) == [(run.pk, "failure", hook.url)]
    notify.send_now()
    notify.send_now(timezone.now() + dt.timedelta(hours=1))
    assert len(hook.requests) == 1


@pytest.mark.django_db(transaction=True)
def test_two_servers_planning_at_once_make_one_delivery_each(receiver):
    hook = receiver()
    task = hooked_task(
        hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}],
        emails=[{"address": "ops@example.com", "events": ["failure"]}],
    )
    runs = [finish(task, Run.Status.FAILED) for _ in range(20)]
    services = [SchedulerService(), SchedulerService()]
    start = threading.Barrier(2)
    errors = []

    def plan(service):
        from django.db import connection

        try:
            start.wait()
            service.plan_notifications()
        except Exception as exc:  # a lost race shows as a failure of the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=plan, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert Delivery.objects.count() == 40
    assert sorted(kinds(task)) == sorted(
        [(run.pk, "failure", hook.url) for run in runs]
        + [(run.pk, "failure", "ops@example.com") for run in runs]
    )


def test_it_sends_a_recovery_only_for_the_first_success_after_a_failure(receiver):
    hook = receiver()
    task = hooked_task(
        hooks=[{"url": hook.url, "events": ["failure", "recovery"], "secret": SECRET}]
    )
    S, F, C = Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.CANCELLED
    # A cancelled run between a failure and a success is nobody's verdict.
    runs = [finish(task, status) for status in (S, F, S, S, F, F, C, S, S)]
    notify.plan()

    assert [(run_id, kind) for run_id, kind, _ in kinds(task)] == [
        (runs[1].pk, "failure"),
        (runs[2].pk, "recovery"),
        (runs[4].pk, "failure"),
        (runs[5].pk, "failure"),
        (runs[7].pk, "recovery"),
    ]


def test_it_reads_the_previous_run_across_planning_passes_and_tasks(receiver):
    hook = receiver()
    subscribed = [{"url": hook.url, "events": ["recovery"], "secret": SECRET}]
    task, other = hooked_task("a", hooks=subscribed), hooked_task("b", hooks=subscribed)
    finish(task, Run.Status.FAILED)
    notify.plan()
    # Another task's success is not this one's recovery, nor the reverse.
    finish(other, Run.Status.SUCCEEDED)
    recovered = finish(task, Run.Status.SUCCEEDED)
    notify.plan()

    assert kinds(task) == [(recovered.pk, "recovery", hook.url)]
    assert kinds(other) == []


def test_it_sends_successes_only_to_who_asked(receiver):
    failures, successes = receiver(), receiver()
    task = hooked_task(
        hooks=[
            {"url": failures.url, "events": ["failure"], "secret": SECRET},
            {"url": successes.url, "events": ["recovery", "success"], "secret": SECRET},
        ]
    )
    ok = finish(task, Run.Status.SUCCEEDED)
    failed = finish(task, Run.Status.FAILED)
    recovered = finish(task, Run.Status.SUCCEEDED)
    notify.plan()

    assert kinds(task) == [
        (ok.pk, "success", successes.url),
        (failed.pk, "failure", failures.url),
        # One delivery per target and event: the recovery, not also a success.
        (recovered.pk, "recovery", successes.url),
    ]


def test_it_sends_nothing_for_cancelled_or_skipped_runs_or_deleted_tasks(receiver):
    hook = receiver()
    every = ["failure", "recovery", "success"]
    task = hooked_task(hooks=[{"url": hook.url, "events": every, "secret": SECRET}])
    finish(task, Run.Status.CANCELLED)
    finish(task, Run.Status.SKIPPED)
    gone = hooked_task("gone", hooks=[{"url": hook.url, "events": every, "secret": SECRET}])
    finish(gone, Run.Status.FAILED)
    gone.delete()

    assert notify.plan() == 0
    assert Delivery.objects.count() == 0
    assert NotifyCursor.objects.get().last_event_id == Event.objects.order_by("-id").first().pk


def test_a_pass_reads_again_only_the_events_of_tasks_that_tell_someone(
    receiver, django_assert_num_queries
):
    hook = receiver()
    quiet = [hooked_task(f"quiet-{n}") for n in range(3)]
    told = hooked_task("told", hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    notify.plan()  # the cursor row exists from here on
    for task in quiet:
        for _ in range(10):
            finish(task, Run.Status.FAILED)

    # The cursor, the events, their tasks, the cursor moved: nothing more.
    with django_assert_num_queries(4):
        assert notify.plan() == 0

    for task in quiet:
        finish(task, Run.Status.FAILED)
    failed = finish(told, Run.Status.FAILED)
    # Also the told task's events again and its deliveries' INSERT, in a savepoint.
    with django_assert_num_queries(8):
        assert notify.plan() == 1
    assert kinds(told) == [(failed.pk, "failure", hook.url)]
    assert Delivery.objects.count() == 1


def test_it_does_not_lose_an_event_that_commits_after_a_later_one(receiver):
    """The outbox pitfall: id 2 visible before id 1. Here id 1 is made to
    appear late by deleting it and inserting it again with its id."""
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.SUCCEEDED)
    notify.plan()  # the cursor is past the events before
    early = finish(task, Run.Status.FAILED)
    late_event = Event.objects.get(run_id=early.pk)
    saved = {f.attname: getattr(late_event, f.attname) for f in Event._meta.concrete_fields}
    late_event.delete()
    later = finish(task, Run.Status.FAILED)

    notify.plan()
    # The gap below the later event is young: the cursor waits before it.
    assert NotifyCursor.objects.get().last_event_id < saved["id"]
    assert kinds(task) == [(later.pk, "failure", hook.url)]

    Event.objects.create(**saved)  # the late commit
    notify.plan()
    assert kinds(task) == [(early.pk, "failure", hook.url), (later.pk, "failure", hook.url)]
    assert NotifyCursor.objects.get().last_event_id == Event.objects.order_by("-id").first().pk


def test_a_gap_that_never_fills_is_passed_after_a_while(receiver):
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.SUCCEEDED)
    notify.plan()
    rolled_back = finish(task, Run.Status.FAILED)
    Event.objects.filter(run_id=rolled_back.pk).delete()
    finish(task, Run.Status.FAILED)
    last = Event.objects.order_by("-id").first().pk

    notify.plan()
    assert NotifyCursor.objects.get().last_event_id < last
    notify.plan(now=timezone.now() + dt.timedelta(seconds=notify.GAP_WAIT_S + 1))
    assert NotifyCursor.objects.get().last_event_id == last


def test_a_webhook_removed_before_sending_fails_its_delivery_without_sending(receiver):
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.FAILED)
    notify.plan()
    task.set_webhooks([])
    task.save()
    notify.send_now()

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.last_error) == (
        "failed",
        "the webhook was removed from the task",
    )
    assert hook.requests == []


@pytest.mark.django_db(transaction=True)
def test_the_service_sends_on_its_own_threads(receiver):
    hook = receiver()
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    finish(task, Run.Status.FAILED)
    service = SchedulerService()

    assert service.plan_notifications()
    assert service.send_notifications()
    service.sender.wait()

    assert Delivery.objects.get().status == "sent"
    assert len(hook.requests) == 1
    # Nothing due any more.
    assert not service.send_notifications()


@pytest.mark.django_db(transaction=True)
def test_a_sender_claims_no_more_deliveries_than_it_has_free_threads(receiver):
    # A claim is a lease of one send's time: a row left waiting in the pool
    # behind slow receivers would outlive it and be sent twice.
    hold = threading.Event()
    hook = receiver(hold=hold)
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    for _ in range(5):
        finish(task, Run.Status.FAILED)
    notify.plan()
    sender = notify.Sender(threads=2)
    try:
        assert sender.send_due() == 2
        assert sender.send_due() == 0  # both threads busy: nothing more is claimed
        statuses = sorted(Delivery.objects.values_list("status", flat=True))
        assert statuses == ["pending"] * 3 + ["sending"] * 2
        hold.set()
        sender.wait()
        while sender.send_due():
            sender.wait()
        assert list(Delivery.objects.values_list("status", flat=True)) == ["sent"] * 5
        assert len(hook.requests) == 5
    finally:
        hold.set()
        sender.close()


# --- e-mail --------------------------------------------------------------------------


def test_it_mails_the_subscribed_addresses_with_django_mail(receiver):
    task = hooked_task(
        emails=[
            {"address": "ops@example.com", "events": ["failure", "recovery"]},
            {"address": "boss@example.com", "events": ["success"]},
        ]
    )
    run = finish(task, Run.Status.FAILED, reason="exit code 1")
    notify.plan()
    notify.send_now()

    [message] = mail.outbox
    assert message.to == ["ops@example.com"]
    assert message.subject == "[scheduler] nightly failed"
    assert f"run {run.pk} failed" in message.body
    assert "Status: failed (exit code 1)" in message.body
    delivery = Delivery.objects.get()
    assert (delivery.channel, delivery.status, delivery.attempts) == ("email", "sent", 1)


# --- the stuck-queue alert -----------------------------------------------------------


@pytest.fixture
def alerts(settings, receiver):
    hook = receiver()
    settings.SCHEDULER_STUCK_QUEUE_MINUTES = 10
    settings.SCHEDULER_ALERT_WEBHOOKS = [hook.url]
    settings.SCHEDULER_ALERT_WEBHOOK_SECRET = "alert-secret"
    settings.SCHEDULER_ALERT_EMAILS = ["oncall@example.com"]
    return hook


def queue_run_needing(labels) -> Run:
    from tasks_app import lifecycle

    task = Task.objects.create(name=f"needs-{'-'.join(labels)}", command="true", labels=labels)
    return lifecycle.trigger_run(task)


def test_it_alerts_once_per_episode_of_a_stuck_queue(alerts):
    make_worker("cpu-box", labels=["cpu"])
    queue_run_needing(["gpu"])
    start = timezone.now()

    # Seen stuck: the episode starts, nothing is sent before the threshold.
    assert stuck.check(start) == 0
    assert stuck.check(start + dt.timedelta(minutes=9)) == 0
    assert stuck.check(start + dt.timedelta(minutes=11)) == 2
    for later in (12, 30, 60):
        assert stuck.check(start + dt.timedelta(minutes=later)) == 0
    assert Delivery.objects.filter(kind="stuck_queue").count() == 2

    notify.send_now(start + dt.timedelta(minutes=61))
    [(_, headers, raw)] = alerts.requests
    assert verified("alert-secret", headers, raw)
    body = json.loads(raw)
    assert body["event"] == "stuck_queue"
    assert body["labels"] == ["gpu"]
    assert body["why"] == "no online worker taking work has all these labels"
    assert body["queued"] == 1
    [message] = mail.outbox
    assert message.to == ["oncall@example.com"]
    assert message.subject == "[scheduler] queue stuck: gpu"

    # A worker that can take it clears the episode; losing it starts a new one.
    gpu = make_worker("gpu-box", labels=["gpu"])
    assert stuck.check(start + dt.timedelta(minutes=62)) == 0
    assert not StuckQueue.objects.exists()
    gpu.delete()
    again = start + dt.timedelta(minutes=63)
    assert stuck.check(again) == 0
    assert stuck.check(again + dt.timedelta(minutes=11)) == 2
    assert Delivery.objects.filter(kind="stuck_queue").count() == 4


def test_two_servers_seeing_the_same_stuck_queue_alert_once(alerts):
    queue_run_needing(["gpu"])
    start = timezone.now()
    one, other = SchedulerService(), SchedulerService()
    stuck.check(start)
    later = start + dt.timedelta(minutes=11)
    assert stuck.check(later) == 2
    # The other server, its row marked alerted meanwhile or not: no second alert.
    StuckQueue.objects.update(alerted_at=None)
    stuck.check(later)
    assert one is not other
    assert Delivery.objects.filter(kind="stuck_queue").count() == 2


def test_busy_matching_workers_or_delayed_work_are_not_a_stuck_queue(alerts):
    from tasks_app import lifecycle

    busy = make_worker("gpu-box", labels=["gpu"], capacity=1)
    first, second = queue_run_needing(["gpu"]), None
    Attempt.objects.filter(run=first).update(status=Attempt.Status.RUNNING, worker=busy)
    task = Task.objects.get(name="needs-gpu")
    second = lifecycle.trigger_run(task)
    assert second.attempts.get().status == "queued"
    # Delayed work that no worker could take is not stuck before it is due.
    later = timezone.now() + dt.timedelta(days=1)
    delayed = Task.objects.create(name="delayed", command="true", labels=["arm"])
    lifecycle.trigger_runs([lifecycle.TriggerRequest(delayed.pk, run_at=later)])

    start = timezone.now()
    stuck.check(start)
    assert stuck.check(start + dt.timedelta(minutes=11)) == 0
    assert not StuckQueue.objects.exists()


def test_no_online_worker_at_all_is_said_so(alerts):
    make_worker("asleep", labels=["gpu"], state="offline")
    queue_run_needing(["gpu"])
    assert stuck.stuck_classes(timezone.now()) == {"gpu": "no worker is online and taking work"}


# --- the API -------------------------------------------------------------------------


def post_json(client, url, payload, method="post"):
    return getattr(client, method)(url, json.dumps(payload), content_type="application/json")


def test_the_api_takes_webhooks_and_never_returns_their_secret(api):
    created = post_json(
        api,
        "/api/tasks",
        {
            "name": "nightly",
            "command": "true",
            "webhooks": [
                {"url": "https://hooks.example.com/a", "secret": SECRET, "events": ["failure"]}
            ],
            "notify_emails": [{"address": "ops@example.com", "events": ["recovery", "failure"]}],
        },
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["webhooks"] == [
        {"url": "https://hooks.example.com/a", "events": ["failure"], "has_secret": True}
    ]
    # In the fixed order failure, recovery, success.
    assert body["notify_emails"] == [
        {"address": "ops@example.com", "events": ["failure", "recovery"]}
    ]
    task = Task.objects.get(pk=body["id"])
    assert task.webhook_secret("https://hooks.example.com/a") == SECRET
    assert SECRET not in json.dumps(task.webhooks)  # encrypted at rest
    for url in ("/api/tasks", f"/api/tasks/{task.pk}"):
        assert SECRET not in api.get(url).content.decode()

    # The task's own JSON sent back keeps the secret; a new URL needs its own.
    shown = api.get(f"/api/tasks/{task.pk}").json()
    shown["webhooks"][0]["events"] = ["failure", "success"]
    changed = post_json(api, f"/api/tasks/{task.pk}", shown, method="put")
    assert changed.status_code == 200, changed.content
    task.refresh_from_db()
    assert task.webhooks_shown()[0]["events"] == ["failure", "success"]
    assert task.webhook_secret("https://hooks.example.com/a") == SECRET


@pytest.mark.parametrize(
    ("hooks", "field", "message"),
    [
        (
            [{"url": "ftp://hooks.example.com/a", "secret": "s", "events": ["failure"]}],
            "webhooks",
            "webhooks[0]: url must be an http:// or https:// URL, not 'ftp://hooks.example.com/a'.",
        ),
        (
            [{"url": "https://hooks.example.com/a", "events": ["failure"]}],
            "webhooks",
            "webhooks[0]: secret is required for a new webhook (it signs each body).",
        ),
        (
            [{"url": "https://hooks.example.com/a", "secret": "s", "events": ["boom"]}],
            "webhooks[0].events[0]",
            "Choose from failure, recovery, success.",
        ),
        (
            [{"url": "https://hooks.example.com/a", "secret": "s", "events": []}],
            "webhooks[0].events",
            None,
        ),
        (
            [{"url": "https://hooks.example.com/a", "secret": "s", "events": ["failure"], "x": 1}],
            "webhooks[0].x",
            "Unknown field.",
        ),
        (
            [
                {"url": "https://hooks.example.com/a", "secret": "s", "events": ["failure"]},
                {"url": "https://hooks.example.com/a", "secret": "t", "events": ["success"]},
            ],
            "webhooks",
            "webhooks[1]: the url https://hooks.example.com/a is given twice.",
        ),
    ],
)
def test_the_api_refuses_a_bad_webhook_naming_it(api, hooks, field, message):
    answer = post_json(api, "/api/tasks", {"name": "n", "command": "true", "webhooks": hooks})

    assert answer.status_code == 400, answer.content
    errors = answer.json()["errors"]
    assert field in errors, errors
    if message:
        assert errors[field] == [message]
    assert not Task.objects.exists()


def test_the_api_refuses_a_bad_address(api):
    answer = post_json(
        api,
        "/api/tasks",
        {
            "name": "n",
            "command": "true",
            "notify_emails": [{"address": "not-an-address", "events": ["failure"]}],
        },
    )
    assert answer.status_code == 400
    assert answer.json()["errors"]["notify_emails"] == [
        "notify_emails[0]: address 'not-an-address' is not an e-mail address."
    ]


# --- the form and the task page ------------------------------------------------------


def test_the_form_takes_lines_and_never_shows_the_secret(bob_client):
    url = reverse("tasks:create")
    bad = bob_client.post(
        url,
        {"name": "n", "command": "true", "webhooks": "https://h.example/x failure", "shards": 1},
    )
    assert bad.status_code == 400
    assert "Line 1: secret is required for a new webhook" in bad.content.decode()
    # Redisplayed after another field's error: the typed secret is not sent back.
    other_error = bob_client.post(
        url, {"name": "", "command": "true", "webhooks": f"https://h.example/x failure {SECRET}"}
    )
    assert other_error.status_code == 400
    assert "Give the task a name." in other_error.content.decode()
    assert "https://h.example/x failure" in other_error.content.decode()
    assert SECRET not in other_error.content.decode()

    made = bob_client.post(
        url,
        {
            "name": "n",
            "command": "true",
            "webhooks": f"https://h.example/x failure,recovery {SECRET}",
            "notify_emails": "ops@example.com failure",
        },
    )
    assert made.status_code == 302, made.content.decode()
    task = Task.objects.get(name="n")
    assert task.webhooks_shown() == [
        {"url": "https://h.example/x", "events": ["failure", "recovery"], "has_secret": True}
    ]
    assert task.notify_emails == [{"address": "ops@example.com", "events": ["failure"]}]

    edit = bob_client.get(reverse("tasks:edit", args=[task.pk])).content.decode()
    assert "https://h.example/x failure,recovery" in edit
    assert SECRET not in edit
    # Saved again as shown (without the secret): the secret stays.
    kept = bob_client.post(
        reverse("tasks:edit", args=[task.pk]),
        {"name": "n", "command": "true", "webhooks": "https://h.example/x failure"},
    )
    assert kept.status_code == 302
    task.refresh_from_db()
    assert task.webhook_secret("https://h.example/x") == SECRET


def test_the_task_page_shows_the_delivery_log(bob_client, receiver):
    hook = receiver(codes=[500])
    task = hooked_task(hooks=[{"url": hook.url, "events": ["failure"], "secret": SECRET}])
    run = finish(task, Run.Status.FAILED)
    notify.plan()
    notify.send_now()

    page = bob_client.get(reverse("tasks:detail", args=[task.pk])).content.decode()
    assert 'id="delivery-log"' in page
    assert hook.url in page
    assert f">#{run.pk}</a>" in page
    assert '<span class="badge pending">pending</span>' in page
    assert "HTTP 500" in page
    assert SECRET not in page


# --- end to end ----------------------------------------------------------------------


@pytest.mark.e2e
def test_a_real_server_posts_the_signed_failure_of_a_real_run(master, start_agent, receiver):
    """`manage.py serve` with a real agent: the run's failure reaches the
    webhook through the server's own service, on its threads, once."""
    import sys

    from tests.harness import wait_for

    hook = receiver()
    start_agent("agent-1")
    created = master.api(
        "POST",
        "tasks",
        json={
            "name": "fails",
            "command": f'{sys.executable} -c "import sys; sys.exit(4)"',
            "webhooks": [{"url": hook.url, "secret": SECRET, "events": ["failure"]}],
        },
    )
    assert created.status_code == 201, created.text
    run = master.api("POST", f"tasks/{created.json()['id']}/run").json()
    run = master.wait_final(run["id"])
    assert run["status"] == "failed"

    wait_for(lambda: hook.requests, timeout=15)
    [(_, headers, raw)] = hook.requests
    assert verified(SECRET, headers, raw)
    body = json.loads(raw)
    assert (body["event"], body["run"]["id"], body["run"]["reason"]) == (
        "failure",
        run["id"],
        run["reason"],
    )
    assert run["reason"].startswith("exit code 4")
