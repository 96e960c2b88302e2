"""End to end: delayed runs, run parameters from the dashboard and concurrency
limits, with a real `manage.py serve` and real agent processes."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading

import pytest

from tests.browser import DESKTOP, chromium_page, log_in
from tests.harness import wait_for

pytestmark = pytest.mark.e2e

# Prints its arguments and two variables as JSON, so the test sees exactly
# what the process was given.
SHOW = (
    f"{sys.executable} -c "
    "\"import json, os, sys; print(json.dumps([sys.argv[1:], os.environ.get('REGION'),"
    " os.environ.get('MODE')]))\""
)


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


@pytest.mark.master_env(SCHEDULER_TICK_S="1")
def test_a_delayed_run_starts_no_earlier_than_its_time_and_soon_after(master, start_agent):
    # The default 1 s tick: the service's re-read of the queue is what wakes it.
    start_agent("agent-1")
    task = master.create_task(name="later", command="true")
    run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)

    response = master.api("POST", f"tasks/{task['id']}/run", json={"run_at": run_at.isoformat()})
    assert response.status_code == 201, response.text
    assert response.json()["run_at"] == run_at.isoformat()

    run = master.wait_final(response.json()["id"])
    assert run["status"] == "succeeded"
    [attempt] = run["attempts"]
    assigned = _time(attempt["assigned_at"])
    started = _time(attempt["started_at"])
    assert assigned >= run_at
    assert started >= run_at
    assert started - run_at < dt.timedelta(seconds=1.5), started - run_at


def test_run_parameters_from_the_task_page_reach_the_process(master, start_agent):
    start_agent("agent-1")
    task = master.create_task(name="show", command=SHOW, env={"MODE": "task"})
    with chromium_page(DESKTOP, "run-params") as page:
        log_in(page, master, then=f"/tasks/{task['id']}/")
        page.click("#run-options summary")
        page.fill("#id_env", "REGION=eu\nMODE=param")
        page.fill("#id_args", "--since\ntwo words\n'quoted'")
        page.click("#run-with-options")
        page.wait_for_url(f"{master.url}/runs/*/")
        run_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
        run = master.wait_final(run_id)
        assert run["status"] == "succeeded", run
        assert run["params"] == {
            "env": {"REGION": "eu", "MODE": "param"},
            "args": ["--since", "two words", "'quoted'"],
        }
        output = json.loads(master.api("GET", f"runs/{run_id}").json()["attempts"][0]["output"])
        assert output == [["--since", "two words", "'quoted'"], "eu", "param"]
        page.reload()
        assert "REGION=eu" in page.inner_text("#run-params")

        # A bad line is a field error on the page, and nothing starts.
        page.goto(f"{master.url}/tasks/{task['id']}/")
        page.click("#run-options summary")
        page.fill("#id_env", "not a pair")
        page.click("#run-with-options")
        error = page.locator(".field-error[data-field=env]")
        assert error.inner_text() == "Line 1: expected KEY=VALUE, got 'not a pair'."
        runs = master.api("GET", f"runs?task={task['id']}").json()["results"]
        assert [r["id"] for r in runs] == [run_id]


def _limited(master, policy: str, command: str) -> dict:
    return master.create_task(
        name=f"limited-{policy}", command=command, concurrency_limit=1, busy_policy=policy
    )


def test_limit_1_queue_runs_the_second_only_after_the_first_ended(master, start_agent):
    start_agent("agent-1", capacity=4)
    task = _limited(master, "queue", f'{sys.executable} -c "import time; time.sleep(1)"')

    first = master.trigger(task["id"])
    second = master.trigger(task["id"])
    third = master.trigger(task["id"])
    assert [r["status"] for r in (first, second, third)] == ["queued"] * 3

    wait_for(lambda: master.run_of(first["id"])["status"] == "running", what="first running")
    page = master.api("GET", f"runs/{second['id']}").json()
    assert page["attempts"][0]["not_before"] is None
    runs = [master.wait_final(r["id"]) for r in (first, second, third)]

    assert [r["status"] for r in runs] == ["succeeded"] * 3
    spans = [
        (_time(r["attempts"][0]["started_at"]), _time(r["attempts"][0]["finished_at"]))
        for r in runs
    ]
    for (_, ended), (began, _) in zip(spans, spans[1:], strict=False):
        assert began >= ended, spans


def test_the_run_page_says_which_run_a_held_run_waits_for(master, start_agent):
    start_agent("agent-1", capacity=4)
    task = _limited(master, "queue", "sleep 30")
    first = master.trigger(task["id"])
    second = master.trigger(task["id"])
    wait_for(lambda: master.run_of(first["id"])["status"] == "running", what="first running")

    with chromium_page(DESKTOP, "held-run") as page:
        log_in(page, master, then=f"/runs/{second['id']}/")
        assert page.inner_text("#run-waiting") == (
            f"Waiting for run #{first['id']} of this task to end (limit 1)."
        )
    master.api("POST", f"runs/{first['id']}/cancel")
    master.api("POST", f"runs/{second['id']}/cancel")


def test_limit_1_skip_records_a_skipped_run_with_the_reason(master, start_agent):
    start_agent("agent-1", capacity=4)
    task = _limited(master, "skip", f'{sys.executable} -c "import time; time.sleep(2)"')
    first = master.trigger(task["id"])
    wait_for(lambda: master.run_of(first["id"])["status"] == "running", what="first running")

    second = master.trigger(task["id"])

    assert second["status"] == "skipped"
    assert second["reason"] == f"skipped: run #{first['id']} still running (limit 1)"
    assert second["attempts"] == []
    assert master.wait_final(first["id"])["status"] == "succeeded"
    assert master.run_of(second["id"])["status"] == "skipped"


def test_limit_1_replace_cancels_the_running_one_and_runs_the_new(master, start_agent):
    start_agent("agent-1", capacity=4)
    task = _limited(master, "replace", "sleep 30")
    first = master.trigger(task["id"])
    wait_for(lambda: master.run_of(first["id"])["status"] == "running", what="first running")
    master.api("PATCH", f"tasks/{task['id']}", json={"command": "true"})

    second = master.trigger(task["id"])

    first_run = master.wait_final(first["id"], timeout=15)
    assert first_run["status"] == "cancelled"
    assert first_run["cancel_requested_by"] == f"replace by run #{second['id']}"
    assert master.wait_final(second["id"])["status"] == "succeeded"


def test_two_simultaneous_triggers_at_limit_1_with_skip_start_one(master, start_agent):
    start_agent("agent-1", capacity=4)
    task = _limited(master, "skip", f'{sys.executable} -c "import time; time.sleep(1)"')
    barrier = threading.Barrier(2)
    answers: list[dict] = []

    def fire():
        barrier.wait()
        response = master.api("POST", f"tasks/{task['id']}/run")
        assert response.status_code == 201, response.text
        answers.append(response.json())

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    runs = sorted((master.wait_final(a["id"]) for a in answers), key=lambda r: r["id"])
    statuses = sorted(r["status"] for r in runs)
    assert statuses == ["skipped", "succeeded"], runs
    ran = next(r for r in runs if r["status"] == "succeeded")
    skipped = next(r for r in runs if r["status"] == "skipped")
    assert skipped["reason"].startswith(f"skipped: run #{ran['id']} still ")
