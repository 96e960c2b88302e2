"""`make bench` cannot rot: it runs here with tiny counts, and its seeding command is checked.

The benchmark asserts nothing on time; this test asserts that it still runs
every section end to end and that its figures count what they claim to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from django.core.management import CommandError, call_command

from tests import engines
from tests.harness import ROOT

BENCH = ROOT / "tests" / "bench.py"
TINY = {
    "--runs": 20,
    "--latency-runs": 5,
    "--fleet": 10,
    "--idle-s": 1,
    "--history": 2000,
    "--samples": 2,
    "--output-mb": 1,
}


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # A session of its own: if it hangs, the servers and agents it started go
    # with it (they share its process group), not just the bench itself.
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _all_succeeded(section: dict, runs: int) -> None:
    assert section["statuses"] == {"succeeded": runs}, section
    assert section["not_succeeded"] == 0, section


@pytest.mark.e2e
@engines.sqlite_only(
    "every section on the default install; on PostgreSQL + Redis the benchmark is"
    " test_it_measures_two_servers_of_one_install_on_postgresql_and_redis"
)
def test_it_runs_every_section_of_the_benchmark_with_tiny_counts():
    args = [str(a) for pair in TINY.items() for a in pair]
    result = _bench(*args)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert {"machine", "config", "revision"} <= set(report)
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"]
    for name in ("throughput_api", "throughput_bulk"):
        section = report[name]
        _all_succeeded(section, 20)
        assert section["runs_found"] == 20
        assert section["runs_per_s"] > 0 and section["triggers_per_s"] > 0
        assert section["cpu"]["cpu_ms_per_run"] > 0
        assert section["created_to_started_ms"]["n"] == 20
    assert report["throughput_api"]["trigger_responses"] == {"201": 20}
    assert report["throughput_bulk"]["trigger_responses"] == {"201": 1}

    latency = report["latency"]
    _all_succeeded(latency, 5)
    for figure in ("created_to_started_ms", "created_to_finished_ms"):
        assert latency[figure]["n"] == 5
        assert 0 < latency[figure]["p50"] <= latency[figure]["p99"]
    assert latency["created_to_started_ms"]["p50"] <= latency["created_to_finished_ms"]["p50"]

    fleet = report["fleet"]
    assert fleet["agents"] == 10
    assert (fleet["declared_lost"], fleet["closed_by_server"], fleet["reconnects"]) == (0, 0, 0)
    assert fleet["worker_states_at_end"] == {"online": 10}
    assert (fleet["fleet"]["error_frames"], fleet["fleet"]["crashes"]) == (0, 0)
    # One by one, then one per agent at once.
    assert fleet["fleet"]["assigns"] == fleet["fleet"]["acks"] == 10 + 10
    assert fleet["server_rss_kb_idle"] > 0 and fleet["idle"]["server_cpu_pct_one_core"] >= 0
    for runs in (fleet["runs_steady"], fleet["runs"]):
        _all_succeeded(runs, 10)
        assert runs["created_to_started_ms"]["n"] == 10

    history = report["history"]
    assert history["runs_stored"] == 2000
    assert len(history["api"]) == len(history["page"]) == 8
    assert history["api"]["first_unfiltered"]["results"] == 50
    assert history["api"]["deep_unfiltered"]["results"] == 50
    assert all(t["median_ms"] > 0 for kind in ("api", "page") for t in history[kind].values())

    output = report["output"]
    assert output["status"] == "succeeded"
    assert output["output_bytes"] == output["stored_bytes"] == output["log_chars"] == 1024 * 1024
    assert output["truncated"] is False
    assert set(output["peak_rss_growth_kb"]) == {"server", "agent"}


def test_it_refuses_a_count_out_of_range_and_an_unknown_section():
    result = _bench("--runs", "0", timeout=30)
    assert result.returncode == 2
    assert "--runs: must be between 1 and 100,000, not 0" in result.stderr

    result = _bench("--only", "latency,speed", timeout=30)
    assert result.returncode == 2
    assert "unknown section speed" in result.stderr

    result = _bench("--servers", "2", timeout=30)
    assert result.returncode == 2
    assert (
        "--servers 2: several servers of one install need --engine postgres (SQLite and the"
        " in-memory layer serve one process)" in result.stderr
    )


@pytest.mark.e2e
@pytest.mark.scale_out
def test_it_measures_two_servers_of_one_install_on_postgresql_and_redis():
    result = _bench(
        "--engine",
        "postgres",
        "--servers",
        "2",
        "--agents",
        "2",
        "--runs",
        "40",
        "--clients",
        "4",
        "--latency-runs",
        "6",
        "--only",
        "throughput_api,throughput_bulk,latency",
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["server"] == "manage.py serve x 2 (throughput/latency), PostgreSQL + Redis"
    for name in ("throughput_api", "throughput_bulk"):
        _all_succeeded(report[name], 40)
        assert report[name]["runs_found"] == 40
    # Four clients over two servers; two bulk requests of 1,000 at most: one.
    assert report["throughput_api"]["trigger_responses"] == {"201": 40}
    _all_succeeded(report["latency"], 6)
    assert report["latency"]["created_to_started_ms"]["n"] == 6


# --- manage.py seedruns ----------------------------------------------------------------


@pytest.mark.django_db
def test_it_seeds_finished_runs_that_the_history_pages_read():
    from tasks_app import history
    from tasks_app.models import Attempt, Run, Task

    call_command("seedruns", "500", "--tasks", "3")

    tasks = list(Task.objects.order_by("name"))
    assert [t.name for t in tasks] == ["seed-01", "seed-02", "seed-03"]
    assert Run.objects.count() == Attempt.objects.count() == 500
    statuses = Counter(Run.objects.values_list("status", flat=True))
    assert set(statuses) <= set(Run.FINAL) and statuses["succeeded"] > 400
    for run in Run.objects.prefetch_related("attempts").select_related("task")[:50]:
        (attempt,) = run.attempts.all()
        assert run.definition == run.task.definition()
        assert attempt.status == run.status and attempt.ready_at == attempt.queued_at
        assert run.created_at <= attempt.queued_at <= attempt.finished_at == run.finished_at
        if run.status == "failed":
            assert run.reason == f"exit code {attempt.exit_code} (after 1 attempt)"
    page = history.runs_page(task=tasks[0].pk, limit=10)
    assert len(page.runs) == 10 and {r.task_id for r in page.runs} == {tasks[0].pk}
    ids = [r.pk for r in page.runs]
    assert ids == sorted(ids, reverse=True)


@pytest.mark.django_db
def test_it_reuses_its_tasks_and_takes_new_ids_when_seeding_again():
    from tasks_app.models import Run, Task

    call_command("seedruns", "30", "--tasks", "2")
    first = set(Run.objects.values_list("pk", flat=True))
    call_command("seedruns", "30", "--tasks", "2")

    assert Task.objects.count() == 2
    assert Run.objects.count() == 60
    assert min(set(Run.objects.values_list("pk", flat=True)) - first) > max(first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0"], "N must be between 1 and 50,000,000, not 0"),
        (["50000001"], "N must be between 1 and 50,000,000, not 50,000,001"),
        (["10", "--tasks", "0"], "--tasks must be between 1 and 1000, not 0"),
        (["10", "--days", "0"], "--days must be more than 0 and at most 36500, not 0.0"),
    ],
)
def test_it_refuses_bad_seed_arguments(args, message):
    with pytest.raises(CommandError) as refused:
        call_command("seedruns", *args)
    assert str(refused.value) == message
