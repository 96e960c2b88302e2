"""Priorities with aging, routing strategies and failover, without sockets: the
queue key on every write, what a dispatch pass picks, and the bad input the
form and the API refuse (the real-agent tests are in test_e2e_routing.py).

These run inside pytest-django's transaction: on_commit hooks do not fire, so
each test calls dispatch itself.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.utils import timezone

from tasks_app import lifecycle, tokens
from tasks_app.forms import TaskForm
from tasks_app.models import HELD_UNTIL, Attempt, Run, Task, queue_at
from tests import engines
from workers_app import dispatch, registration
from workers_app.models import Worker
from workers_app.waiting import why_waiting

pytestmark = pytest.mark.django_db

MINUTE = dt.timedelta(minutes=1)


@pytest.fixture(autouse=True)
def minute_steps(settings):
    settings.SCHEDULER_PRIORITY_AGING_S = 60.0


def make_worker(name: str, *, capacity: int = 1, labels=(), state=Worker.State.ONLINE) -> Worker:
    return Worker.objects.create(
        name=name,
        capacity=capacity,
        labels=list(labels),
        state=state,
        last_heartbeat=timezone.now(),
        credential_hash=tokens.digest(f"wkr_{name}"),
    )


def make_task(name: str, **fields) -> Task:
    return Task.objects.create(name=name, command="true", **fields)


def trigger(task: Task) -> Run:
    return lifecycle.trigger_run(task)


def attempt_of(run: Run) -> Attempt:
    return run.attempts.get()


def waited(run: Run, minutes: float) -> Attempt:
    """As if its attempt had been queued that many minutes ago."""
    attempt = attempt_of(run)
    shift = dt.timedelta(minutes=minutes)
    Attempt.objects.filter(pk=attempt.pk).update(
        queued_at=attempt.queued_at - shift,
        ready_at=attempt.ready_at - shift,
        queue_at=attempt.queue_at - shift,
    )
    attempt.refresh_from_db()
    return attempt


def dispatched(*workers: Worker) -> list[tuple[str, int]]:
    """One pass; (worker name, run id) of what it claimed, in queue order."""
    names = {w.pk: w.name for w in workers}
    pairs = dispatch.dispatch()
    runs = dict(Attempt.objects.filter(pk__in=[a for _, a in pairs]).values_list("pk", "run_id"))
    return [(names.get(w, w), runs[a]) for w, a in pairs]


def finish(worker: Worker, attempt_id: int, status: str = "succeeded") -> None:
    now = timezone.now().timestamp()
    lifecycle.finish(
        worker.pk,
        attempt_id,
        lifecycle.Result(status, 0 if status == "succeeded" else 1, "", now, now),
    )


# --- priorities and aging ------------------------------------------------------------


def test_the_queue_key_is_ready_at_less_a_step_per_priority_point(settings):
    ready = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    assert queue_at(ready, 0) == ready
    assert queue_at(ready, 10) == ready - 10 * MINUTE
    assert queue_at(ready, 100) == ready - 100 * MINUTE
    settings.SCHEDULER_PRIORITY_AGING_S = 0.5
    assert queue_at(ready, 10) == ready - dt.timedelta(seconds=5)


def test_a_trigger_stores_the_priority_and_its_head_start():
    run = trigger(make_task("urgent", priority=30))
    attempt = attempt_of(run)
    assert attempt.priority == 30
    assert attempt.ready_at - attempt.queue_at == 30 * MINUTE
    assert run.definition["priority"] == 30


def test_higher_priority_goes_first_and_fifo_within_a_priority():
    node = make_worker("node", capacity=1)
    low, high = make_task("low"), make_task("high", priority=10)
    lows = [trigger(low) for _ in range(3)]
    highs = [trigger(high) for _ in range(2)]

    order = []
    for _ in range(5):
        [(name, run_id)] = dispatched(node)
        order.append(run_id)
        finish(node, attempt_of(Run.objects.get(pk=run_id)).pk)

    assert order == [r.pk for r in highs] + [r.pk for r in lows]


def test_low_priority_work_that_waited_longer_than_its_gap_goes_before_newer_high_work():
    node = make_worker("node", capacity=1)
    low, high = make_task("low"), make_task("high", priority=10)
    patient = trigger(low)
    waited(patient, 11)  # 11 minutes > 10 points x 1 minute
    recent = trigger(low)
    waited(recent, 9)  # 9 minutes < 10 points x 1 minute
    urgent = trigger(high)

    order = []
    for _ in range(3):
        [(_, run_id)] = dispatched(node)
        order.append(run_id)
        finish(node, attempt_of(Run.objects.get(pk=run_id)).pk)

    assert order == [patient.pk, urgent.pk, recent.pk]


def test_nothing_waits_behind_newer_work_for_more_than_a_hundred_steps():
    node = make_worker("node", capacity=1)
    oldest = trigger(make_task("low"))
    waited(oldest, 100.5)
    top = trigger(make_task("top", priority=100))

    assert dispatched(node) == [("node", oldest.pk)]
    finish(node, attempt_of(oldest).pk)
    assert dispatched(node) == [("node", top.pk)]


def test_a_head_start_never_lets_a_delayed_or_held_attempt_go_early():
    node = make_worker("node", capacity=2)
    task = make_task("top", priority=100, concurrency_limit=1)
    first = trigger(task)
    held = trigger(task)  # behind the limit
    delayed = lifecycle.trigger_runs(
        [lifecycle.TriggerRequest(task.pk, run_at=timezone.now() + dt.timedelta(minutes=5))]
    )[0][0]
    assert attempt_of(held).ready_at == HELD_UNTIL
    # The delayed one's head start (100 minutes) puts its queue_at in the past.
    assert attempt_of(delayed).queue_at < timezone.now() < attempt_of(delayed).ready_at

    assert dispatched(node) == [("node", first.pk)]
    assert dispatched(node) == []


def test_a_released_held_run_keeps_its_head_start():
    node = make_worker("node", capacity=1)
    task = make_task("busy", priority=20, concurrency_limit=1)
    first, second = trigger(task), trigger(task)
    assert dispatched(node) == [("node", first.pk)]

    finish(node, attempt_of(first).pk)  # the run ends: the held one is released

    released = attempt_of(second)
    assert released.ready_at != HELD_UNTIL
    assert released.ready_at - released.queue_at == 20 * MINUTE
    assert dispatched(node) == [("node", second.pk)]


def test_a_retry_keeps_its_head_start():
    node = make_worker("node", capacity=1)
    run = trigger(make_task("busy", priority=20, max_retries=1))
    dispatched(node)

    finish(node, attempt_of(run).pk, "failed")

    retry = run.attempts.get(try_number=2)
    assert retry.ready_at > timezone.now()
    assert retry.ready_at - retry.queue_at == 20 * MINUTE
    assert retry.priority == 20


def test_a_refused_attempt_requeued_with_a_delay_keeps_its_head_start():
    node = make_worker("node", capacity=1)
    run = trigger(make_task("urgent", priority=5))
    dispatched(node)

    lifecycle.requeue(node.pk, [attempt_of(run).pk], delay_s=30)

    attempt = attempt_of(run)
    assert attempt.status == Attempt.Status.QUEUED
    assert attempt.ready_at > timezone.now()
    assert attempt.ready_at - attempt.queue_at == 5 * MINUTE


# --- strategies ----------------------------------------------------------------------


def test_least_loaded_gives_each_attempt_to_the_idle_worker_first():
    a, b = make_worker("a", capacity=2), make_worker("b", capacity=2)
    task = make_task("plain")
    for _ in range(3):
        run = trigger(task)
        dispatched(a, b)
        finish(Worker.objects.get(pk=attempt_of(run).worker_id), attempt_of(run).pk)
    # Each time both were idle: the same (first) one took it.
    assert set(Attempt.objects.values_list("worker_name", flat=True)) == {"a"}


def test_round_robin_gives_successive_attempts_to_successive_workers():
    workers = [make_worker(n, capacity=2) for n in ("a", "b", "c")]
    task = make_task("turns", strategy="round_robin")
    names = []
    for _ in range(7):
        run = trigger(task)
        [(name, _)] = dispatched(*workers)
        names.append(name)
        finish(Worker.objects.get(name=name), attempt_of(run).pk)
    assert names == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_skips_a_full_worker():
    a, b, c = (make_worker(n, capacity=1) for n in ("a", "b", "c"))
    task = make_task("turns", strategy="round_robin")
    runs = [trigger(task) for _ in range(2)]
    assert [name for name, _ in dispatched(a, b, c)] == ["a", "b"]
    finish(a, attempt_of(runs[0]).pk)  # b still busy: the next turn after b is c, then a
    trigger(task), trigger(task)
    assert [name for name, _ in dispatched(a, b, c)] == ["c", "a"]


def test_random_spreads_attempts_over_the_workers():
    workers = [make_worker(n, capacity=1) for n in ("a", "b", "c")]
    task = make_task("dice", strategy="random")
    seen = set()
    for _ in range(40):
        run = trigger(task)
        [(name, _)] = dispatched(*workers)
        seen.add(name)
        finish(Worker.objects.get(name=name), attempt_of(run).pk)
    assert seen == {"a", "b", "c"}


def test_a_pinned_attempt_goes_to_its_worker_only():
    idle, pinned = make_worker("idle", capacity=4), make_worker("pinned", capacity=1)
    task = make_task("pin", strategy="pinned", pinned_worker="pinned")
    first, second = trigger(task), trigger(task)
    assert attempt_of(first).labels_key == f"@{pinned.pk}"

    # The idle worker is less loaded, yet takes neither; the pinned one has one slot.
    assert dispatched(idle, pinned) == [("pinned", first.pk)]
    assert dispatched(idle, pinned) == []
    finish(pinned, attempt_of(first).pk)
    assert dispatched(idle, pinned) == [("pinned", second.pk)]


def test_a_pinned_attempt_keeps_the_task_labels_and_never_fails_over():
    node = make_worker("node", capacity=1, labels=["gpu"])
    other = make_worker("other", capacity=1, labels=["gpu"])
    task = make_task("pin", strategy="pinned", pinned_worker="node", labels=["gpu"], max_retries=2)
    run = trigger(task)
    assert attempt_of(run).labels_key == f"@{node.pk},gpu"
    dispatched(node, other)

    lifecycle.mark_lost(node.pk, "worker lost")
    retry = run.attempts.get(try_number=2)
    retry.ready_at = retry.queue_at = timezone.now()
    retry.save()
    assert retry.labels_key == f"@{node.pk},gpu"
    assert dispatched(node, other) == [("node", run.pk)]


def test_a_pinned_run_waits_for_its_offline_worker_and_says_so():
    make_worker("free", capacity=2)
    make_worker("away", capacity=1, state=Worker.State.OFFLINE)
    run = trigger(make_task("pin", strategy="pinned", pinned_worker="away"))

    assert dispatch.dispatch() == []
    assert why_waiting(run, list(run.attempts.all())) == (
        "Pinned to away (offline): it starts when that worker takes work again "
        "(pinned work never goes to another worker)."
    )


def test_a_run_of_a_task_pinned_to_a_deleted_worker_fails_at_trigger():
    gone = make_worker("gone")
    task = make_task("pin", strategy="pinned", pinned_worker="gone")
    gone.delete()

    run = trigger(task)

    run.refresh_from_db()
    assert (run.status, run.reason) == (
        Run.Status.FAILED,
        "pinned worker 'gone' no longer exists or was revoked",
    )
    assert run.finished_at is not None
    assert not run.attempts.exists()


def test_deleting_a_worker_fails_the_work_queued_for_it_alone():
    doomed, other = make_worker("doomed"), make_worker("other")
    pinned = trigger(make_task("pin", strategy="pinned", pinned_worker="doomed"))
    plain = trigger(make_task("plain"))

    doomed.delete()

    pinned.refresh_from_db()
    assert (pinned.status, pinned.reason) == (
        Run.Status.FAILED,
        "pinned worker 'doomed' was deleted (after 1 attempt)",
    )
    assert attempt_of(plain).status == Attempt.Status.QUEUED
    assert dispatched(other) == [("other", plain.pk)]


def test_revoking_a_worker_fails_its_pinned_work_and_later_pins_to_it():
    revoked, other = make_worker("revoked"), make_worker("other")
    task = make_task("pin", strategy="pinned", pinned_worker="revoked")
    queued = trigger(task)
    plain = trigger(make_task("plain"))

    registration.revoke(revoked)

    queued.refresh_from_db()
    assert (queued.status, queued.reason) == (
        Run.Status.FAILED,
        "pinned worker 'revoked' was revoked (after 1 attempt)",
    )
    later = trigger(task)
    later.refresh_from_db()
    assert (later.status, later.reason) == (
        Run.Status.FAILED,
        "pinned worker 'revoked' no longer exists or was revoked",
    )
    assert attempt_of(plain).status == Attempt.Status.QUEUED
    assert dispatched(other) == [("other", plain.pk)]


def test_a_replacing_run_that_cannot_be_routed_replaces_nothing():
    node = make_worker("node", capacity=2)
    task = make_task("everywhere", strategy="broadcast", concurrency_limit=1, busy_policy="replace")
    first = trigger(task)
    assert dispatched(node) == [("node", first.pk)]
    Worker.objects.filter(pk=node.pk).update(drain_requested=True)  # nobody takes new work

    second = trigger(task)

    second.refresh_from_db()
    assert second.status == Run.Status.FAILED
    assert second.reason == "broadcast: no online worker takes new work"
    first.refresh_from_db()
    assert first.cancel_requested_at is None and not first.is_final


def test_broadcast_queues_one_pinned_shard_per_matching_online_worker():
    a = make_worker("a", labels=["linux"])
    b = make_worker("b", labels=["linux", "gpu"])
    make_worker("mac", labels=["mac"])
    make_worker("away", labels=["linux"], state=Worker.State.OFFLINE)
    make_worker("draining", labels=["linux"], state=Worker.State.DRAINING)
    revoked = make_worker("revoked", labels=["linux"])
    Worker.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())

    run = trigger(make_task("everywhere", strategy="broadcast", labels=["linux"]))

    run.refresh_from_db()
    assert run.definition["shards"] == 2
    assert list(run.attempts.order_by("shard_index").values_list("shard_index", "labels_key")) == [
        (0, f"@{a.pk},linux"),
        (1, f"@{b.pk},linux"),
    ]
    assert sorted(dispatched(a, b)) == [("a", run.pk), ("b", run.pk)]


def test_broadcast_with_no_matching_online_worker_fails_at_once():
    make_worker("mac", labels=["mac"])
    run = trigger(make_task("everywhere", strategy="broadcast", labels=["linux"]))

    run.refresh_from_db()
    assert (run.status, run.reason) == (
        Run.Status.FAILED,
        "broadcast: no online worker with the labels linux takes new work",
    )
    assert not run.attempts.exists()


def test_a_broadcast_with_many_long_labels_fails_with_its_reason_cut_to_the_column():
    labels = [f"{i:02d}-{'x' * 61}" for i in range(32)]  # the most a task may have
    run = trigger(make_task("everywhere", strategy="broadcast", labels=labels))

    run.refresh_from_db()
    whole = f"broadcast: no online worker with the labels {', '.join(labels)} takes new work"
    assert (run.status, run.reason) == (Run.Status.FAILED, whole[:500])


# --- failover ------------------------------------------------------------------------


def test_a_refused_attempt_goes_to_another_worker_with_a_free_slot():
    a, b = make_worker("a", capacity=2), make_worker("b", capacity=2)
    run = trigger(make_task("plain"))
    assert dispatched(a, b) == [("a", run.pk)]

    lifecycle.requeue(a.pk, [attempt_of(run).pk])

    assert attempt_of(run).avoid_worker == a.pk
    # a is idle again and first in line, yet the attempt goes to b.
    assert dispatched(a, b) == [("b", run.pk)]


def test_it_goes_back_to_the_same_worker_when_no_other_has_a_free_slot():
    a, b = make_worker("a", capacity=1), make_worker("b", capacity=1)
    blocker = trigger(make_task("blocker"))
    run = trigger(make_task("plain"))
    assert dispatched(a, b) == [("a", blocker.pk), ("b", run.pk)]
    lifecycle.requeue(b.pk, [attempt_of(run).pk])

    assert dispatched(a, b) == [("b", run.pk)]


def test_a_retry_of_a_lost_attempt_avoids_the_worker_it_was_lost_on():
    a, b = make_worker("a", capacity=2), make_worker("b", capacity=2)
    run = trigger(make_task("plain", max_retries=1, retry_backoff_s=0))
    assert dispatched(a, b) == [("a", run.pk)]

    lifecycle.lose([attempt_of(run).pk], "worker lost: no heartbeat for 15s")

    retry = run.attempts.get(try_number=2)
    assert retry.avoid_worker == a.pk
    assert dispatched(a, b) == [("b", run.pk)]


@pytest.mark.parametrize("strategy", ["round_robin", "random"])
def test_the_other_strategies_fail_over_too(strategy):
    a, b = make_worker("a", capacity=2), make_worker("b", capacity=2)
    run = trigger(make_task("plain", strategy=strategy))
    [(first, _)] = dispatched(a, b)
    first_worker = Worker.objects.get(name=first)

    for _ in range(5):
        lifecycle.requeue(first_worker.pk, [attempt_of(run).pk])
        [(name, _)] = dispatched(a, b)
        assert name != first
        lifecycle.requeue(Worker.objects.get(name=name).pk, [attempt_of(run).pk])
        [(back, _)] = dispatched(a, b)
        assert back == first


# --- bad input -----------------------------------------------------------------------

BASE = {"name": "t", "command": "true"}


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        ({"priority": -1}, {"priority": ["Ensure this value is greater than or equal to 0."]}),
        ({"priority": 101}, {"priority": ["Ensure this value is less than or equal to 100."]}),
        ({"priority": "high"}, {"priority": ["Enter a whole number."]}),
        ({"priority": "2.5"}, {"priority": ["Enter a whole number."]}),
        (
            {"strategy": "fastest"},
            {"strategy": ["Select a valid choice. fastest is not one of the available choices."]},
        ),
        (
            {"strategy": "pinned"},
            {"pinned_worker": ["Name the worker a pinned task runs on."]},
        ),
        (
            {"strategy": "pinned", "pinned_worker": "nobody"},
            {"pinned_worker": ["No worker is named 'nobody'."]},
        ),
        (
            {"strategy": "random", "pinned_worker": "node"},
            {
                "pinned_worker": [
                    "Only a pinned task names a worker (strategy is random): "
                    "choose pinned, or leave it empty."
                ]
            },
        ),
        (
            {"pinned_worker": "node"},
            {
                "pinned_worker": [
                    "Only a pinned task names a worker (strategy is least_loaded): "
                    "choose pinned, or leave it empty."
                ]
            },
        ),
    ],
)
def test_the_form_refuses_bad_routing_fields(fields, errors):
    make_worker("node")
    form = TaskForm(data={**BASE, **fields})
    assert not form.is_valid()
    assert form.errors == errors


def test_the_form_takes_good_routing_fields_and_defaults():
    make_worker("node")
    form = TaskForm(data={**BASE, "strategy": "pinned", "pinned_worker": " node ", "priority": 7})
    assert form.is_valid(), form.errors
    task = form.save()
    assert (task.priority, task.strategy, task.pinned_worker) == (7, "pinned", "node")
    plain = TaskForm(data={**BASE, "name": "plain"})
    assert plain.is_valid(), plain.errors
    assert (plain.cleaned_data["priority"], plain.cleaned_data["strategy"]) == (0, "least_loaded")


def api_post(api, payload):
    response = api.post("/api/tasks", json.dumps(payload), content_type="application/json")
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("fields", "message", "errors"),
    [
        (
            {"priority": 101},
            "invalid fields",
            {"priority": ["Ensure this value is less than or equal to 100."]},
        ),
        (
            {"priority": -5},
            "invalid fields",
            {"priority": ["Ensure this value is greater than or equal to 0."]},
        ),
        ({"priority": 2.5}, "invalid fields", {"priority": ["Expected an integer."]}),
        ({"priority": "9"}, "invalid fields", {"priority": ["Expected an integer."]}),
        (
            {"strategy": "fastest"},
            "invalid fields",
            {"strategy": ["Choose least_loaded, round_robin, random, pinned or broadcast."]},
        ),
        (
            {"strategy": "pinned"},
            "invalid task",
            {"pinned_worker": ["Name the worker a pinned task runs on."]},
        ),
        (
            {"strategy": "pinned", "pinned_worker": "nobody"},
            "invalid task",
            {"pinned_worker": ["No worker is named 'nobody'."]},
        ),
        (
            {"strategy": "broadcast", "pinned_worker": "node"},
            "invalid task",
            {
                "pinned_worker": [
                    "Only a pinned task names a worker (strategy is broadcast): "
                    "choose pinned, or leave it empty."
                ]
            },
        ),
    ],
)
def test_the_api_refuses_bad_routing_fields_and_changes_nothing(api, fields, message, errors):
    make_worker("node")
    status, body = api_post(api, {**BASE, **fields})

    assert status == 400, body
    assert (body["error"], body["errors"]) == (message, errors)
    assert not Task.objects.exists()


PIN_SHARDS = (
    "A pinned task runs as one shard on its worker: set shards to 1, "
    "or choose another strategy to spread shards over workers."
)
BROADCAST_SHARDS = "A broadcast makes one shard per matching online worker: set shards to 1."


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"strategy": "pinned", "pinned_worker": "node", "shards": 4}, PIN_SHARDS),
        ({"strategy": "broadcast", "shards": 2}, BROADCAST_SHARDS),
    ],
)
def test_a_strategy_that_contradicts_the_shards_is_refused_in_form_and_api(api, fields, error):
    make_worker("node")
    form = TaskForm(data={**BASE, **fields})
    assert not form.is_valid()
    assert form.errors == {"shards": [error]}

    status, body = api_post(api, {**BASE, **fields})

    assert status == 400, body
    assert body["errors"] == {"shards": [error]}
    assert not Task.objects.exists()


def test_a_patch_that_shards_a_pinned_task_is_refused_and_changes_nothing(api):
    make_worker("node")
    task = make_task("pin", strategy="pinned", pinned_worker="node")
    response = api.patch(
        f"/api/tasks/{task.pk}", json.dumps({"shards": 3}), content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["errors"] == {"shards": [PIN_SHARDS]}
    task.refresh_from_db()
    assert task.shards == 1
    # Sharded and round robin together is what spreading means: fine.
    response = api.patch(
        f"/api/tasks/{task.pk}",
        json.dumps({"shards": 3, "strategy": "round_robin", "pinned_worker": ""}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()
    assert (response.json()["shards"], response.json()["strategy"]) == (3, "round_robin")


def test_the_api_refuses_a_bad_patch_and_keeps_the_task(api):
    make_worker("node")
    task = make_task("kept", priority=3)
    response = api.patch(
        f"/api/tasks/{task.pk}",
        json.dumps({"strategy": "pinned", "pinned_worker": "nobody"}),
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["errors"] == {"pinned_worker": ["No worker is named 'nobody'."]}
    task.refresh_from_db()
    assert (task.priority, task.strategy, task.pinned_worker) == (3, "least_loaded", "")


def test_the_api_takes_and_shows_the_routing_fields(api):
    make_worker("node")
    status, body = api_post(
        api, {**BASE, "priority": 100, "strategy": "pinned", "pinned_worker": "node"}
    )
    assert status == 201, body
    assert (body["priority"], body["strategy"], body["pinned_worker"]) == (100, "pinned", "node")
    response = api.patch(
        f"/api/tasks/{body['id']}",
        json.dumps({"strategy": "round_robin", "pinned_worker": ""}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()
    assert (response.json()["strategy"], response.json()["pinned_worker"]) == ("round_robin", "")


# --- pages ---------------------------------------------------------------------------


def test_the_task_page_shows_priority_and_routing(bob_client):
    make_worker("node")
    task = make_task("pin", priority=42, strategy="pinned", pinned_worker="node")

    html = bob_client.get(f"/tasks/{task.pk}/").content.decode()

    assert '<dd id="task-priority">42</dd>' in html
    assert 'id="task-strategy">pinned to <code id="task-pinned-worker">node</code></dd>' in html


def test_the_form_refuses_a_pin_to_nobody_inside_the_open_advanced_fold(bob_client):
    response = bob_client.post(
        "/tasks/new/",
        {"name": "x", "command": "true", "strategy": "pinned", "pinned_worker": "nobody"},
        headers={"HX-Request": "true"},
    )

    html = response.content.decode()
    fold = html[html.index('<details class="advanced" id="advanced" open>') :]
    assert (
        '<p class="error field-error" data-field="pinned_worker">'
        "No worker is named &#x27;nobody&#x27;.</p>" in fold
    )
    assert not Task.objects.exists()


def test_the_run_page_says_a_pinned_run_waits_for_its_worker(bob_client):
    make_worker("away", state=Worker.State.OFFLINE)
    run = trigger(make_task("pin", strategy="pinned", pinned_worker="away"))

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert (
        '<p class="notice" id="run-waiting">Pinned to away (offline): it starts when that '
        "worker takes work again (pinned work never goes to another worker).</p>" in html
    )


def test_a_held_broadcast_run_is_released_whole():
    a, b = make_worker("a", capacity=2), make_worker("b", capacity=2)
    task = make_task("everywhere", strategy="broadcast", concurrency_limit=1)
    first, second = trigger(task), trigger(task)
    assert [x.ready_at for x in second.attempts.all()] == [HELD_UNTIL, HELD_UNTIL]
    assert sorted(dispatched(a, b)) == [("a", first.pk), ("b", first.pk)]

    for attempt in first.attempts.all():
        finish(Worker.objects.get(pk=attempt.worker_id), attempt.pk)

    assert HELD_UNTIL not in [x.ready_at for x in second.attempts.all()]
    assert sorted(dispatched(a, b)) == [("a", second.pk), ("b", second.pk)]


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        ({"pinned_worker": "nobody"}, {"pinned_worker": ["No worker is named 'nobody'."]}),
        ({"strategy": "broadcast", "shards": 3}, {"shards": [BROADCAST_SHARDS]}),
    ],
)
def test_the_admin_refuses_what_the_form_and_api_refuse(admin_client, fields, errors):
    response = admin_client.post(
        "/admin/tasks_app/task/add/",
        {
            "name": "x",
            "command": "true",
            "env": "{}",
            "labels": "[]",
            "max_retries": 0,
            "retry_backoff_s": 10,
            "retry_backoff_max_s": 600,
            "busy_policy": "queue",
            "shards": 1,
            "priority": 0,
            "strategy": "pinned",
            "pinned_worker": "",
            "enabled": "on",
            "timezone": "UTC",
            "misfire_policy": "skip",
            "created_at_0": "2026-01-01",
            "created_at_1": "00:00:00",
            **fields,
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors == errors
    assert not Task.objects.exists()


def test_a_patch_of_other_fields_keeps_the_pin_and_a_vanished_pin_must_be_fixed(api):
    node = make_worker("node")
    task = make_task("pin", strategy="pinned", pinned_worker="node")

    response = api.patch(
        f"/api/tasks/{task.pk}", json.dumps({"priority": 9}), content_type="application/json"
    )
    assert response.status_code == 200, response.json()
    assert (response.json()["priority"], response.json()["pinned_worker"]) == (9, "node")

    node.delete()
    response = api.patch(
        f"/api/tasks/{task.pk}", json.dumps({"priority": 1}), content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["errors"] == {"pinned_worker": ["No worker is named 'node'."]}


def _pass_statements() -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        dispatch.dispatch(fresh=False)
    return [q["sql"] for q in captured.captured_queries if "SAVEPOINT" not in q["sql"]]


def test_a_pass_over_mixed_priorities_strategies_and_held_work_costs_what_it_fills():
    from django.db import connection

    make_worker("a", capacity=1), make_worker("b", capacity=1)
    tasks = [
        make_task("low"),
        make_task("high", priority=50, strategy="round_robin"),
        make_task("dice", priority=5, strategy="random"),
        make_task("held", priority=100, concurrency_limit=1),
    ]

    def fill(count: int) -> None:
        lifecycle.trigger_runs([lifecycle.TriggerRequest(t.pk, count=count) for t in tasks])

    fill(3)
    dispatch.dispatch()  # builds the board, fills both slots
    busy = list(Attempt.objects.filter(status="assigned").values_list("pk", "worker_id"))
    finish(Worker.objects.get(pk=busy[0][1]), busy[0][0])
    dispatch.board.mark([busy[0][1]])
    small = _pass_statements()

    fill(2000)  # 8,000 more, 2,000 of them held by the limit
    finish(Worker.objects.get(pk=busy[1][1]), busy[1][0])
    dispatch.board.mark([busy[1][1]])
    large = _pass_statements()

    assert len(large) == len(small)
    reads = [q for q in large if 'FROM "tasks_app_attempt"' in q and "LIMIT" in q]
    assert reads
    sort = engines.SORT_STEP[connection.vendor]
    with connection.cursor() as cursor:
        for read in reads:
            plan = engines.query_plan(cursor, read)
            assert "attempt_queue" in plan and sort not in plan, plan


@pytest.mark.parametrize("new_limit", [2, None])
def test_held_runs_let_go_by_a_raised_or_cleared_limit_keep_their_head_start(new_limit):
    node = make_worker("node", capacity=4)
    task = make_task("busy", priority=30, concurrency_limit=1)
    first, second = trigger(task), trigger(task)
    assert dispatched(node) == [("node", first.pk)]
    assert attempt_of(second).ready_at == HELD_UNTIL

    task.concurrency_limit = new_limit
    task.save()

    released = attempt_of(second)
    assert released.ready_at != HELD_UNTIL
    assert released.ready_at - released.queue_at == 30 * MINUTE
    assert dispatched(node) == [("node", second.pk)]
