"""Notifications: a task's webhooks and e-mail told of its runs, once each.

Two duties of the server's service (workers_app.service), both safe to run
on every server at once:

`plan` reads the run.finished events (tasks_app.events) after a cursor kept
in the database (NotifyCursor) and makes one Delivery row per target that
wants the event: `failure` (the run failed; a cancelled or skipped run is
someone's choice, not a failure), `recovery` (it succeeded and the task's
previous run to end succeeded-or-failed had failed) and `success` (it
succeeded: only for targets that ask; a recovery is sent as a recovery, not
twice). Rows are inserted with ON CONFLICT DO NOTHING against the unique
(event, channel, target): two servers planning the same events make one row.

The outbox pitfall: on PostgreSQL an event id is taken when its row is
inserted, not when its transaction commits, so id 100 may become visible
after 101. The cursor is therefore the end of the *contiguous* run of ids
seen (the frontier); events past a gap are planned at once, and read again
on each pass until the gap fills (a late commit, planned then) or has been
open for GAP_WAIT_S (a rolled-back transaction's ids, which never come).
Planning an event again is harmless: the unique constraint decides.

`send` claims due deliveries (pending, or sending with a lapsed claim: a
server that died mid-send) by moving them to `sending` with a lease, under
SKIP LOCKED on PostgreSQL (SQLite has one writer at a time), then sends
outside any transaction and records the outcome with a conditional UPDATE
(only the claim it made). Network errors, 5xx and 429 are tried again with
backoff; any other answer outside 2xx fails for good.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import F, OuterRef, Subquery
from django.db.models.fields.json import KT
from django.urls import reverse
from django.utils import timezone

from tasks_app import events
from tasks_app.exceptions import SecretsUnreadable
from tasks_app.models import Delivery, Event, NotifyCursor, Run, Task

log = logging.getLogger(__name__)

FAILURE, RECOVERY, SUCCESS, STUCK_QUEUE = "failure", "recovery", "success", "stuck_queue"
SIGNATURE_HEADER = "X-Scheduler-Signature"
# Events read per planning pass, deliveries claimed per sending pass.
PLAN_BATCH = 1000
SEND_BATCH = 50
# How long a gap in the event ids may wait for its late commit (seconds); the
# writer's transactions last milliseconds, so this is ample.
GAP_WAIT_S = 10.0
# A run.finished event older than this when first read is not notified: a
# notification that late is noise (a cursor made on an old database).
HORIZON = dt.timedelta(hours=1)
# A claim lapses this long after its send's timeout (the server died mid-send).
CLAIM_GRACE_S = 60.0
# Threads sending at once per server.
SENDERS = 4


# --- planning ---------------------------------------------------------------------


def _cursor() -> int:
    row, _ = NotifyCursor.objects.get_or_create(pk=1)
    return row.last_event_id


def _frontier(start: int, ids: list[int], ats: dict[int, dt.datetime], now) -> int:
    """The highest id up to which every id after `start` is known: seen, or
    a gap older than GAP_WAIT_S (ids of a rolled-back transaction).

    A cursor never moved (0) starts at the first event there is: ids before
    it were rolled back or deleted (a PostgreSQL sequence starts wherever it
    has got to), and waiting on them would only delay the first pass.
    """
    if start == 0 and ids:
        start = ids[0] - 1
    frontier = start
    for event_id in ids:
        if event_id != frontier + 1 and now - ats[event_id] < dt.timedelta(seconds=GAP_WAIT_S):
            break  # a gap still young: an earlier id may yet commit
        frontier = event_id
    return frontier


def plan(now=None) -> int:
    """One planning pass: deliveries for the run.finished events past the cursor;
    how many were planned."""
    now = now or timezone.now()
    start = _cursor()
    rows = list(
        Event.objects.filter(id__gt=start)
        .order_by("id")
        .values_list("id", "at", "kind", "task_id")[:PLAN_BATCH]
    )
    if not rows:
        return 0
    ids = [row[0] for row in rows]
    frontier = _frontier(start, ids, {event_id: at for event_id, at, _, _ in rows}, now)
    finished = {
        event_id: task_id
        for event_id, _, kind, task_id in rows
        if kind == events.RUN_FINISHED and task_id is not None
    }
    made = _plan_events(finished, now) if finished else 0
    if frontier > start:
        # Monotonic: a server with an older view never moves it back.
        NotifyCursor.objects.filter(pk=1, last_event_id__lt=frontier).update(
            last_event_id=frontier, updated_at=now
        )
    return made


def _plan_events(finished_tasks: dict[int, int], now) -> int:
    """Deliveries for these run.finished events (event id: task id)."""
    # Most tasks tell nobody (and a deleted one has nobody left to tell): only
    # the events of those that do are read again.
    tasks = {
        task.pk: task
        for task in Task.objects.filter(pk__in=set(finished_tasks.values())).only(
            "pk", "webhooks", "notify_emails"
        )
        if task.webhooks or task.notify_emails
    }
    event_ids = [e for e, task_id in finished_tasks.items() if task_id in tasks]
    if not event_ids:
        return 0
    # Each event with the status of its task's previous run to end succeeded
    # or failed, read off the earlier run.finished events of the task (they
    # are in the order runs ended, by the event_task index): one query for the
    # whole batch.
    previous = (
        Event.objects.filter(
            task_id=OuterRef("task_id"),
            id__lt=OuterRef("id"),
            kind=events.RUN_FINISHED,
        )
        .filter(data__status__in=[Run.Status.SUCCEEDED, Run.Status.FAILED])
        .order_by("-id")
        .values(prev_status=KT("data__status"))[:1]
    )
    finished = list(
        Event.objects.filter(id__in=event_ids, task_id__isnull=False, at__gte=now - HORIZON)
        .annotate(previous_status=Subquery(previous))
        .order_by("id")
    )
    plans: list[Delivery] = []
    for event in finished:
        task = tasks[event.task_id]
        wanted = _kinds(event.data.get("status"), event.previous_status)
        targets = [(Delivery.Channel.WEBHOOK, h["url"], h["events"]) for h in task.webhooks]
        targets += [(Delivery.Channel.EMAIL, e["address"], e["events"]) for e in task.notify_emails]
        for channel, target, subscribed in targets:
            kind = next((k for k in wanted if k in subscribed), None)
            if kind is not None:
                plans.append(
                    Delivery(
                        event_id=event.pk,
                        run_id=event.run_id,
                        task_id=event.task_id,
                        kind=kind,
                        channel=channel,
                        target=target,
                        next_try_at=now,
                        created_at=now,
                    )
                )
    return _insert(plans)


def _kinds(status: str | None, previous: str | None) -> list[str]:
    """What a run ending in `status` is, most specific first."""
    if status == Run.Status.FAILED:
        return [FAILURE]
    if status == Run.Status.SUCCEEDED:
        return [RECOVERY, SUCCESS] if previous == Run.Status.FAILED else [SUCCESS]
    return []  # cancelled (someone's choice), skipped (the task was busy)


def _insert(plans: list[Delivery]) -> int:
    """Insert what is not planned yet; how many were planned.

    In a fixed order, so that two servers inserting the same keys at once wait
    on each other instead of deadlocking.
    """
    if not plans:
        return 0
    plans.sort(key=lambda d: (d.event_id or 0, d.episode or "", d.channel, d.target))
    with transaction.atomic():
        Delivery.objects.bulk_create(plans, ignore_conflicts=True)
    # ON CONFLICT DO NOTHING does not say which rows it skipped: this counts
    # the planned ones, some perhaps planned already by another server.
    return len(plans)


def plan_alert(episode: str, body: dict, now=None) -> int:
    """Deliveries of an operators' alert (a stuck queue) to the configured
    webhooks and addresses, once per episode whoever plans it."""
    now = now or timezone.now()
    targets = [(Delivery.Channel.WEBHOOK, url) for url in settings.SCHEDULER_ALERT_WEBHOOKS]
    targets += [(Delivery.Channel.EMAIL, address) for address in settings.SCHEDULER_ALERT_EMAILS]
    return _insert(
        [
            Delivery(
                episode=episode,
                kind=STUCK_QUEUE,
                channel=channel,
                target=target,
                body=body,
                next_try_at=now,
                created_at=now,
            )
            for channel, target in targets
        ]
    )


# --- sending ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    delivery: Delivery
    claim: int  # its attempts count after the claim: the token of this send


def claim(now=None, limit: int = SEND_BATCH) -> list[Claimed]:
    """Due deliveries, moved to `sending` under a lease; each is this caller's
    alone (race: another server's sender claiming the same rows)."""
    now = now or timezone.now()
    lease = dt.timedelta(seconds=settings.SCHEDULER_NOTIFY_TIMEOUT_S + CLAIM_GRACE_S)
    due = Delivery.objects.filter(
        status__in=[Delivery.Status.PENDING, Delivery.Status.SENDING], next_try_at__lte=now
    ).order_by("next_try_at", "id")
    with transaction.atomic():
        if connection.features.has_select_for_update_skip_locked:
            # Rows another server is claiming are skipped, not waited for.
            due = due.select_for_update(skip_locked=True)
        # SQLite: the IMMEDIATE transaction holds the one write lock from here.
        ids = list(due.values_list("id", flat=True)[:limit])
        if not ids:
            return []
        Delivery.objects.filter(id__in=ids).update(
            status=Delivery.Status.SENDING,
            attempts=F("attempts") + 1,
            next_try_at=now + lease,
        )
        rows = list(Delivery.objects.filter(id__in=ids).order_by("id"))
    return [Claimed(row, row.attempts) for row in rows]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retry: bool = False
    code: int | None = None
    error: str = ""


def backoff(tries: int) -> dt.timedelta:
    """The wait after the `tries`-th failed try: the base, four times longer each time."""
    return dt.timedelta(seconds=settings.SCHEDULER_NOTIFY_BACKOFF_S * 4 ** (tries - 1))


def record(claimed: Claimed, outcome: Outcome, now=None) -> None:
    """Store a send's outcome, if the claim is still ours (it lapsed and another
    server claimed the row meanwhile: theirs is the one that counts)."""
    now = now or timezone.now()
    tries = claimed.claim
    if outcome.ok:
        status, next_try = Delivery.Status.SENT, now
    elif outcome.retry and tries < settings.SCHEDULER_NOTIFY_TRIES:
        status, next_try = Delivery.Status.PENDING, now + backoff(tries)
    else:
        status, next_try = Delivery.Status.FAILED, now
    Delivery.objects.filter(
        pk=claimed.delivery.pk, status=Delivery.Status.SENDING, attempts=tries
    ).update(
        status=status,
        next_try_at=next_try,
        response_code=outcome.code,
        last_error=outcome.error[:500],
        sent_at=now if outcome.ok else None,
    )


def messages(claimed: list[Claimed]) -> list[tuple[Claimed, Callable[[], Outcome]]]:
    """Each claimed delivery with the call that sends it, built from the
    database now (in the caller's thread): the senders touch no database."""
    run_ids = {c.delivery.run_id for c in claimed if c.delivery.run_id}
    runs = {run.pk: run for run in Run.objects.filter(pk__in=run_ids)}
    task_ids = {c.delivery.task_id for c in claimed if c.delivery.task_id}
    tasks = {task.pk: task for task in Task.objects.filter(pk__in=task_ids).only("pk", "webhooks")}
    out = []
    for item in claimed:
        delivery = item.delivery
        try:
            body, secret = _body_and_secret(delivery, runs, tasks)
        except _Undeliverable as exc:
            out.append((item, _fail_with(str(exc))))
            continue
        if delivery.channel == Delivery.Channel.WEBHOOK:
            raw = json.dumps(body, sort_keys=True).encode()
            out.append((item, _webhook_call(delivery.target, raw, secret)))
        else:
            out.append((item, _email_call(delivery.target, body)))
    return out


class _Undeliverable(Exception):
    """A delivery that cannot be sent as planned (its webhook is gone, its secret unreadable)."""


def _fail_with(reason: str) -> Callable[[], Outcome]:
    return lambda: Outcome(ok=False, error=reason)


def _time(value):
    return value.isoformat() if value else None


def run_url(run_id: int) -> str:
    return settings.SCHEDULER_PUBLIC_URL.rstrip("/") + reverse("tasks:run-detail", args=[run_id])


def _body_and_secret(delivery: Delivery, runs: dict, tasks: dict) -> tuple[dict, str]:
    if delivery.kind == STUCK_QUEUE:
        return {"event": STUCK_QUEUE, **delivery.body}, settings.SCHEDULER_ALERT_WEBHOOK_SECRET
    run = runs.get(delivery.run_id)
    if run is None:
        raise _Undeliverable("the run no longer exists")
    secret = ""
    if delivery.channel == Delivery.Channel.WEBHOOK:
        task = tasks.get(delivery.task_id)
        try:
            secret = task.webhook_secret(delivery.target) if task else None
        except SecretsUnreadable:
            raise _Undeliverable(
                "the webhook's secret was encrypted with another SECRET_KEY: set it again"
            ) from None
        if secret is None:
            raise _Undeliverable("the webhook was removed from the task")
    duration = run.duration
    body = {
        "event": delivery.kind,
        "task": {"id": run.task_id, "name": run.task_name},
        "run": {
            "id": run.pk,
            "status": run.status,
            "reason": run.reason,
            "trigger": run.trigger,
            "created_at": _time(run.created_at),
            "started_at": _time(run.started_at),
            "finished_at": _time(run.finished_at),
            "duration_s": round(duration.total_seconds(), 3) if duration else None,
            "url": run_url(run.pk),
        },
    }
    return body, secret


def signature(raw: bytes, secret: str) -> str:
    """The X-Scheduler-Signature of a body: its HMAC-SHA256 under the webhook's secret."""
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def _webhook_call(url: str, raw: bytes, secret: str) -> Callable[[], Outcome]:
    def call() -> Outcome:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "django-task-scheduler",
            SIGNATURE_HEADER: signature(raw, secret),
        }
        try:
            # Redirects are not followed: a POST's body and signature are for this URL.
            answer = requests.post(
                url,
                data=raw,
                headers=headers,
                timeout=settings.SCHEDULER_NOTIFY_TIMEOUT_S,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
        code = answer.status_code
        if 200 <= code < 300:
            return Outcome(ok=True, code=code)
        # The receiver is down or busy: later. Anything else is its answer for good.
        retry = code >= 500 or code == 429
        return Outcome(ok=False, retry=retry, code=code, error=f"HTTP {code} {answer.reason}")

    return call


def _email_call(address: str, body: dict) -> Callable[[], Outcome]:
    subject, text = email_text(body)

    def call() -> Outcome:
        try:
            send_mail(subject, text, None, [address])
        except Exception as exc:  # smtplib.SMTPException, OSError, a backend's own
            return Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
        return Outcome(ok=True)

    return call


def email_text(body: dict) -> tuple[str, str]:
    """An e-mail's subject and text for a notification body."""
    if body["event"] == STUCK_QUEUE:
        labels = ", ".join(body["labels"]) or "no labels"
        return (
            f"[scheduler] queue stuck: {labels}",
            f"Queued work needing [{labels}] has waited since {body['since']}: {body['why']}.\n",
        )
    run, task = body["run"], body["task"]
    what = {FAILURE: "failed", RECOVERY: "recovered", SUCCESS: "succeeded"}[body["event"]]
    lines = [
        f"Task {task['name']}: run {run['id']} {what}.",
        f"Status: {run['status']}" + (f" ({run['reason']})" if run["reason"] else ""),
        f"Trigger: {run['trigger']}",
        f"Finished: {run['finished_at']}",
        f"Duration: {run['duration_s']} s" if run["duration_s"] is not None else "",
        run["url"],
    ]
    return f"[scheduler] {task['name']} {what}", "\n".join(line for line in lines if line) + "\n"


class Sender:
    """Sends claimed deliveries on threads of its own, so that a slow webhook
    never holds up the service's duties (which run on the writer's thread)."""

    def __init__(self, threads: int = SENDERS) -> None:
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="notify")
        self._lock = threading.Lock()
        self._busy: set[Future] = set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._busy)

    def send_due(self, now=None) -> int:
        """Claim due deliveries, at most as many as there are free threads, and
        hand them to the threads; how many. No more: a claim is a lease of one
        send's timeout (and some grace), and a row waiting in the pool behind
        slow receivers would outlive it and be claimed and sent again by
        another server (or this one's next tick)."""
        free = self._threads - self.in_flight()
        if free <= 0:
            return 0  # still busy with the last ones: their rows wait, pending
        claimed = claim(now, limit=free)
        for item, call in messages(claimed):
            future = self._pool.submit(self._send, item, call)
            with self._lock:
                self._busy.add(future)
            future.add_done_callback(self._done)
        return len(claimed)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._busy.discard(future)

    @staticmethod
    def _send(item: Claimed, call: Callable[[], Outcome]) -> None:
        try:
            outcome = call()
        except Exception as exc:  # a bug must not leave the row claimed until its lease
            log.exception("sending delivery %s failed", item.delivery.pk)
            outcome = Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
        try:
            record(item, outcome)
        finally:
            # This thread's own connection: closed, not left to time out.
            connection.close()

    def wait(self, timeout: float = 30.0) -> None:
        """Until everything handed over so far is sent and recorded (tests, shutdown)."""
        with self._lock:
            pending = list(self._busy)
        for future in pending:
            future.result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def send_now(now=None) -> int:
    """Claim, send and record due deliveries in this thread (manage.py, tests)."""
    claimed = claim(now)
    for item, call in messages(claimed):
        record(item, call(), now)
    return len(claimed)


def log_of_task(task_id: int, limit: int = 20) -> list[Delivery]:
    """A task's latest deliveries, newest first (the task page)."""
    return list(Delivery.objects.filter(task_id=task_id).order_by("-id")[:limit])
