"""Fan-out and fan-in without sockets: a run's shards, their retries, fail
fast, the merge, the result, the assign frames and the API around them."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks_app import lifecycle, logs, results
from tasks_app.lifecycle import Result
from tasks_app.models import MAX_SHARDS, Attempt, Run
from tasks_app.signals import stop_requested
from workers_app import dispatch, protocol
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def ok(exit_code: int = 0) -> Result:
    return Result(
        status="succeeded" if exit_code == 0 else "failed",
        exit_code=exit_code,
        reason="" if exit_code == 0 else f"exit code {exit_code}",
        started_at=None,
        finished_at=None,
    )


def sharded(task, shards: int, merge: str = "", retries: int = 0) -> Run:
    task.shards, task.merge_command, task.max_retries = shards, merge, retries
    task.retry_backoff_s = 0
    task.save()
    return lifecycle.trigger_run(task)


def run_shard(worker: Worker, attempt: Attempt, exit_code: int = 0, stdout: str = "") -> None:
    """The worker takes, runs and reports this attempt, printing stdout."""
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1)
    if stdout:
        logs.append_logs([logs.Chunk(worker.pk, attempt.pk, 0, "stdout", stdout)])
    assert lifecycle.finish(worker.pk, attempt.pk, ok(exit_code)) is lifecycle.Outcome.STORED


def latest(run: Run, shard: int) -> Attempt:
    return run.attempts.filter(shard_index=shard).order_by("-try_number").first()


@pytest.fixture
def big_worker(worker) -> Worker:
    worker.capacity = 2000
    worker.save()
    return worker


# --- fan-out -------------------------------------------------------------------


def test_it_creates_one_attempt_per_shard_in_one_insert(task):
    task.shards = MAX_SHARDS
    task.save()
    with CaptureQueriesContext(connection) as queries:
        run = lifecycle.trigger_run(task)
    inserts = [q for q in queries if q["sql"].startswith(f'INSERT INTO "{Attempt._meta.db_table}"')]
    assert len(inserts) == 1
    assert run.definition["shards"] == MAX_SHARDS
    assert sorted(run.attempts.values_list("shard_index", flat=True)) == list(range(MAX_SHARDS))
    assert len(run.queued_attempts) == MAX_SHARDS


def test_each_shards_assign_frame_says_its_index_and_the_runs_count(task):
    run = sharded(task, 3)
    frames = [
        protocol.assign(a.pk, run.pk, run.task_name, run.definition, a.shard_index)
        for a in run.attempts.order_by("shard_index")
    ]
    assert [(f["shard_index"], f["shard_count"]) for f in frames] == [(0, 3), (1, 3), (2, 3)]
    assert all("merge" not in f and f["argv"] for f in frames)


def test_a_failed_shard_is_retried_alone(task, big_worker):
    run = sharded(task, 3, retries=1)
    shards = list(run.attempts.order_by("shard_index"))
    run_shard(big_worker, shards[0])
    run_shard(big_worker, shards[1], exit_code=1)

    assert sorted(run.attempts.values_list("shard_index", "try_number")) == [
        (0, 1),
        (1, 1),
        (1, 2),
        (2, 1),
    ]
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING


# --- fan-in --------------------------------------------------------------------


def test_a_shard_out_of_retries_fails_the_run_names_it_and_stops_the_rest(
    task, big_worker, django_capture_on_commit_callbacks
):
    run = sharded(task, 4, merge="cat", retries=1)
    shards = list(run.attempts.order_by("shard_index"))
    assert lifecycle.assign(shards[0].pk, big_worker.pk, big_worker.name)
    assert lifecycle.mark_started(big_worker.pk, shards[0].pk, None, 1)
    stopped = []

    def receiver(sender, attempts, **kwargs):
        stopped.extend(attempts)

    stop_requested.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            run_shard(big_worker, shards[2], exit_code=1)
            run_shard(big_worker, latest(run, 2), exit_code=1)
    finally:
        stop_requested.disconnect(receiver)

    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.reason == "shard 2 of 4 failed: exit code 1 (after 2 attempts)"
    # Fail fast: the queued shards are cancelled, the running one is told to stop,
    # and no merge was queued.
    assert latest(run, 1).status == latest(run, 3).status == Attempt.Status.CANCELLED
    assert stopped == [(big_worker.pk, shards[0].pk)]
    assert not run.attempts.filter(shard_index=4).exists()
    # Its report arriving afterwards retries nothing and changes nothing.
    assert lifecycle.finish(big_worker.pk, shards[0].pk, ok(1)) is lifecycle.Outcome.STORED
    assert run.attempts.filter(shard_index=0).count() == 1
    run.refresh_from_db()
    assert run.reason == "shard 2 of 4 failed: exit code 1 (after 2 attempts)"


def test_the_merge_is_queued_once_every_shard_succeeded_and_decides_the_run(task, big_worker):
    run = sharded(task, 3, merge="sort")
    for attempt in run.attempts.order_by("shard_index"):
        assert not run.attempts.filter(shard_index=3).exists()
        run_shard(big_worker, attempt, stdout=f"part {attempt.shard_index}\n")

    merge = run.attempts.get(shard_index=3)
    assert (merge.status, merge.try_number) == (Attempt.Status.QUEUED, 1)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    frame = protocol.assign(merge.pk, run.pk, run.task_name, run.definition, 3)
    assert (frame["argv"], frame["shell"], frame["shard_count"]) == (None, None, 3)
    assert frame["merge"] == {
        "argv": ["sort"],
        "shell": None,
        "outputs": f"/api/agent/attempts/{merge.pk}/shards/",
    }

    run_shard(big_worker, merge, stdout="merged\n")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert results.head(results.result_attempt_ids(run)) == ("merged\n", False)


def test_a_failed_merge_fails_the_run(task, big_worker):
    run = sharded(task, 2, merge="false")
    for attempt in list(run.attempts.all()):
        run_shard(big_worker, attempt)
    run_shard(big_worker, run.attempts.get(shard_index=2), exit_code=2)

    run.refresh_from_db()
    assert (run.status, run.reason) == ("failed", "merge failed: exit code 2 (after 1 attempt)")


def test_refresh_runs_costs_the_same_at_1000_shards_as_at_2(task, big_worker):
    def queries_for(shards: int) -> int:
        run = sharded(task, shards)
        run.attempts.update(status=Attempt.Status.SUCCEEDED)
        with CaptureQueriesContext(connection) as queries:
            lifecycle.refresh_runs([run.pk])
        run.refresh_from_db()
        assert run.status == Run.Status.SUCCEEDED
        return len(queries)

    assert queries_for(MAX_SHARDS) == queries_for(2)


# --- result --------------------------------------------------------------------


def test_without_a_merge_the_result_is_the_shards_stdout_in_shard_order(task, big_worker, api):
    run = sharded(task, 3)
    attempts = list(run.attempts.order_by("-shard_index"))  # finished in reverse order
    for attempt in attempts:
        run_shard(big_worker, attempt, stdout=f"from {attempt.shard_index}\n")

    body = api.get(f"/api/runs/{run.pk}").json()
    assert body["result"] == "from 0\nfrom 1\nfrom 2\n"
    # Without ?shard= a sharded run's attempts come without their output.
    assert {(a["output"], a["stdout"], a["stderr"]) for a in body["attempts"]} == {(None,) * 3}
    shard_2 = api.get(f"/api/runs/{run.pk}?shard=2").json()["attempts"]
    assert [(a["shard_index"], a["stdout"]) for a in shard_2 if a["stdout"] is not None] == [
        (2, "from 2\n")
    ]
    assert body["result_truncated"] is False
    assert body["shards"] == [
        {"index": i, "status": "succeeded", "worker": "node-1", "attempts": 1} for i in range(3)
    ]
    assert body["merge"] is None
    download = api.get(f"/api/runs/{run.pk}/result")
    assert download.status_code == 200
    assert download["Content-Disposition"] == f'attachment; filename="run-{run.pk}-result.txt"'
    assert b"".join(download.streaming_content) == b"from 0\nfrom 1\nfrom 2\n"


def test_the_inline_result_is_cut_and_says_so(task, big_worker, api, monkeypatch):
    monkeypatch.setattr(results, "RESULT_INLINE_CHARS", 5)
    monkeypatch.setattr(results.head, "__defaults__", (5,))
    run = sharded(task, 1)
    run_shard(big_worker, run.attempts.get(), stdout="0123456789")
    body = api.get(f"/api/runs/{run.pk}").json()
    assert (body["result"], body["result_truncated"]) == ("01234", True)


def test_a_run_has_no_result_until_it_succeeded(task, api):
    run = sharded(task, 2)
    assert api.get(f"/api/runs/{run.pk}").json()["result"] is None
    answer = api.get(f"/api/runs/{run.pk}/result")
    assert answer.status_code == 409
    assert answer.json() == {
        "error": f"run {run.pk} is queued; a result exists once it has succeeded"
    }


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("shard", ["x", "-1", "1.5", "123456", "%C2%B9"])
def test_the_run_api_refuses_a_bad_shard_with_a_clear_error(task, api, shard):
    run = sharded(task, 2)
    answer = api.get(f"/api/runs/{run.pk}?shard={shard}")
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("shard must be a shard's index (a whole number)")


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        (0, "Ensure this value is greater than or equal to 1."),
        (MAX_SHARDS + 1, f"Ensure this value is less than or equal to {MAX_SHARDS}."),
        ("3", "Expected an integer."),
    ],
)
def test_the_api_refuses_bad_shard_counts_with_a_field_error(api, shards, message):
    answer = api.post(
        "/api/tasks",
        json.dumps({"name": "x", "command": "true", "shards": shards}),
        content_type="application/json",
    )
    assert answer.status_code == 400
    assert answer.json()["errors"] == {"shards": [message]}


def test_the_form_refuses_bad_shard_counts_and_merge_commands(bob_client):
    answer = bob_client.post(
        "/tasks/new/",
        {"name": "x", "command": "true", "shards": "1001", "merge_command": "'unclosed"},
    )
    form = answer.context["form"]
    assert form.errors["shards"] == [f"Ensure this value is less than or equal to {MAX_SHARDS}."]
    assert form.errors["merge_command"] == [
        "Cannot split the command into arguments: No closing quotation."
    ]


# --- the shard-output endpoint --------------------------------------------------


def test_the_shard_outputs_go_only_to_the_worker_holding_the_merge(
    task, big_worker, worker_credential, client
):
    run = sharded(task, 2, merge="cat")
    for attempt in list(run.attempts.order_by("shard_index")):
        run_shard(big_worker, attempt, stdout=f"shard {attempt.shard_index}\n")
    merge = run.attempts.get(shard_index=2)
    url = f"/api/agent/attempts/{merge.pk}/shards/1"
    holder = {"Authorization": f"Bearer {worker_credential}"}

    # Not yet assigned to it: refused.
    assert client.get(url, headers=holder).status_code == 403
    assert lifecycle.assign(merge.pk, big_worker.pk, big_worker.name)
    served = client.get(url, headers=holder)
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == b"shard 1\n"
    # Another worker, no credential, a shard the run does not have, a shard attempt.
    from tasks_app import tokens

    Worker.objects.create(name="node-2", capacity=1, credential_hash=tokens.digest("wkr_two"))
    other = client.get(url, headers={"Authorization": "Bearer wkr_two"})
    assert other.status_code == 403
    assert other.json() == {
        "error": f"worker node-2 does not hold merge attempt {merge.pk} (or no shard 1)"
    }
    assert client.get(url).status_code == 401
    assert client.get(url[:-1] + "2", headers=holder).status_code == 403
    shard = run.attempts.get(shard_index=0)
    assert client.get(f"/api/agent/attempts/{shard.pk}/shards/0", headers=holder).status_code == 403


def test_the_merge_gets_every_shards_output_in_one_framed_answer(
    task, big_worker, worker_credential, client, monkeypatch
):
    # Two chunks a read: the frames must come out whole across batches.
    monkeypatch.setattr(results, "CHUNKS_PER_READ", 2)
    run = sharded(task, 4, merge="cat")
    outputs = {0: "a\nb\n", 1: "", 2: "é\n", 3: "d\n"}
    for attempt in list(run.attempts.order_by("shard_index")):
        index = attempt.shard_index
        assert lifecycle.assign(attempt.pk, big_worker.pk, big_worker.name)
        assert lifecycle.mark_started(big_worker.pk, attempt.pk, None, 1)
        chunks = [outputs[index][:2], outputs[index][2:]] if outputs[index] else []
        logs.append_logs(
            [logs.Chunk(big_worker.pk, attempt.pk, n, "stdout", c) for n, c in enumerate(chunks)]
            + [logs.Chunk(big_worker.pk, attempt.pk, 9, "stderr", "not this\n")]
        )
        assert lifecycle.finish(big_worker.pk, attempt.pk, ok()) is lifecycle.Outcome.STORED
    merge = run.attempts.get(shard_index=4)
    url = f"/api/agent/attempts/{merge.pk}/shards/"
    holder = {"Authorization": f"Bearer {worker_credential}"}
    assert client.get(url, headers=holder).status_code == 403  # not its attempt yet
    assert lifecycle.assign(merge.pk, big_worker.pk, big_worker.name)

    served = client.get(url, headers=holder)

    assert served.status_code == 200
    assert b"".join(served.streaming_content) == "0 4\na\nb\n1 0\n2 3\né\n3 2\nd\n".encode()
    assert client.get(url).status_code == 401
    from tasks_app import tokens

    Worker.objects.create(name="node-2", capacity=1, credential_hash=tokens.digest("wkr_two"))
    assert client.get(url, headers={"Authorization": "Bearer wkr_two"}).status_code == 403


def test_a_runs_api_page_costs_the_same_queries_at_200_shards_as_at_2(
    task, big_worker, api, monkeypatch
):
    # The result is read CHUNKS_PER_READ chunks at a time: one batch for both here.
    monkeypatch.setattr(results, "CHUNKS_PER_READ", 1000)

    def queries_for(shards: int) -> int:
        run = sharded(task, shards)
        for attempt in list(run.attempts.all()):
            run_shard(big_worker, attempt, stdout=f"{attempt.shard_index}\n")
        with CaptureQueriesContext(connection) as queries:
            body = api.get(f"/api/runs/{run.pk}?shard=1").json()
        assert body["result"] == "".join(f"{i}\n" for i in range(shards))
        assert [a["stdout"] for a in body["attempts"]] == [None, "1\n"] + [None] * (shards - 2)
        return len(queries)

    small = queries_for(2)  # first: it also records the API token's use
    assert queries_for(200) == queries_for(2) <= small


def test_a_held_sharded_run_is_released_whole_when_the_run_before_it_ends(task, big_worker):
    task.concurrency_limit = 1
    first = sharded(task, 3)
    second = lifecycle.trigger_run(task)
    assert [a.is_held for a in second.attempts.all()] == [True, True, True]

    for attempt in list(first.attempts.all()):
        run_shard(big_worker, attempt)

    first.refresh_from_db()
    assert first.status == Run.Status.SUCCEEDED
    assert [a.is_held for a in second.attempts.all()] == [False, False, False]


def test_a_failed_sharded_runs_page_opens_on_the_shard_that_failed_it(task, big_worker, bob_client):
    run = sharded(task, 3)
    shards = list(run.attempts.order_by("shard_index"))
    run_shard(big_worker, shards[0])
    run_shard(big_worker, shards[1], exit_code=3, stdout="bad input on line 7\n")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert 'id="shard-selected">Shard 1: its attempts below' in html
    assert f'id="attempt-{shards[1].pk}"' in html
    assert "bad input on line 7" in html
    assert f'id="attempt-{shards[0].pk}"' not in html
    # Closed, it shows the grid alone.
    html = bob_client.get(f"/runs/{run.pk}/?shard=none").content.decode()
    assert 'id="shard-hint"' in html
    assert f'id="attempt-{shards[1].pk}"' not in html
    # And stays closed when the live page re-renders it: its region says so.
    assert f'data-live-src="/runs/{run.pk}/?shard=none"' in html


def test_an_assignment_handed_back_after_the_run_failed_is_cancelled_not_queued(task, big_worker):
    run = sharded(task, 2)
    first, second = run.attempts.order_by("shard_index")
    assert lifecycle.assign(second.pk, big_worker.pk, big_worker.name)
    run_shard(big_worker, first, exit_code=1)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED

    # Its agent refuses it, or never accepts it: it must not go back to the queue.
    assert lifecycle.requeue(big_worker.pk, [second.pk]) == [second.pk]

    second.refresh_from_db()
    assert second.status == Attempt.Status.CANCELLED
    run.refresh_from_db()
    assert run.reason == "shard 0 of 2 failed: exit code 1 (after 1 attempt)"


def test_dispatch_never_starts_a_queued_shard_of_a_failed_run(task, big_worker):
    run = sharded(task, 2)
    first, second = run.attempts.order_by("shard_index")
    run_shard(big_worker, first, exit_code=1)
    # As if the fail-fast cancel had missed it (another process queued it meanwhile).
    Attempt.objects.filter(pk=second.pk).update(status=Attempt.Status.QUEUED)
    Worker.objects.filter(pk=big_worker.pk).update(state=Worker.State.ONLINE)

    assert dispatch.dispatch() == [(big_worker.pk, second.pk)]

    second.refresh_from_db()
    assert second.status == Attempt.Status.CANCELLED
