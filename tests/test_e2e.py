"""End to end: a real `manage.py serve` and real agent processes running real commands."""

from __future__ import annotations

import ast
import datetime as dt
import subprocess
import sys
import threading

import pytest
import requests

from tests.harness import AGENT, wait_for

pytestmark = pytest.mark.e2e

PRINT_42 = f'{sys.executable} -c "print(6*7)"'


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _create_and_run(master, **task) -> dict:
    created = master.api("POST", "tasks", json=task)
    assert created.status_code == 201, created.text
    run = master.api("POST", f"tasks/{created.json()['id']}/run")
    assert run.status_code == 201, run.text
    return run.json()


def test_it_runs_a_real_command_and_stores_the_result(master, start_agent):
    start_agent("agent-1")
    run = _create_and_run(master, name="answer", command=PRINT_42)
    assert run["status"] == "queued"

    run = master.wait_final(run["id"])

    assert run["status"] == "succeeded"
    (attempt,) = run["attempts"]
    assert attempt["status"] == "succeeded"
    assert attempt["exit_code"] == 0
    assert attempt["output"] == "42\n"
    assert attempt["stdout"] == "42\n"
    assert attempt["stderr"] == ""
    assert attempt["worker"] == "agent-1"
    assert attempt["reason"] == ""
    times = [_time(attempt[k]) for k in ("queued_at", "assigned_at", "started_at", "finished_at")]
    assert times == sorted(times)
    assert _time(run["created_at"]) <= _time(run["started_at"]) <= _time(run["finished_at"])


def test_it_records_a_nonzero_exit_code_as_failed(master, start_agent):
    start_agent("agent-1")
    run = _create_and_run(
        master,
        name="three",
        command=f"{sys.executable} -c \"import sys; print('bad', file=sys.stderr); sys.exit(3)\"",
    )

    run = master.wait_final(run["id"])

    assert run["status"] == "failed"
    (attempt,) = run["attempts"]
    assert (attempt["status"], attempt["exit_code"], attempt["reason"]) == (
        "failed",
        3,
        "exit code 3",
    )
    assert attempt["stderr"] == "bad\n"
    assert attempt["stdout"] == ""


def test_it_fails_a_missing_executable_with_a_reason_and_the_agent_keeps_working(
    master, start_agent
):
    agent = start_agent("agent-1")
    run = _create_and_run(master, name="missing", command="no-such-command-xyz --flag")

    run = master.wait_final(run["id"])

    (attempt,) = run["attempts"]
    assert attempt["status"] == "failed"
    assert attempt["exit_code"] is None
    assert attempt["reason"].startswith("cannot start:")
    assert "no-such-command-xyz" in attempt["reason"]
    # It never started, yet its times are in order: it did not finish before it began.
    assert _time(attempt["assigned_at"]) <= _time(attempt["started_at"])
    assert _time(attempt["started_at"]) <= _time(attempt["finished_at"])
    assert _time(run["started_at"]) <= _time(run["finished_at"])
    assert agent.proc.poll() is None
    follow_up = master.wait_final(_create_and_run(master, name="after", command=PRINT_42)["id"])
    assert follow_up["status"] == "succeeded"


def test_it_gives_the_process_its_run_ids_env_and_working_dir(master, start_agent, tmp_path):
    start_agent("agent-1")
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    run = _create_and_run(
        master,
        name="env-check",
        command='echo "$SCHEDULER_RUN_ID $SCHEDULER_ATTEMPT_ID $SCHEDULER_TASK_NAME '
        '$GREETING $(pwd)"',
        shell=True,
        env={"GREETING": "hello world"},
        working_dir=str(workdir),
    )

    run = master.wait_final(run["id"])

    (attempt,) = run["attempts"]
    assert attempt["output"] == f"{run['id']} {attempt['id']} env-check hello world {workdir}\n"


def test_it_keeps_a_run_queued_until_a_worker_with_the_labels_is_online(master, start_agent):
    start_agent("plain", labels="linux")
    run = _create_and_run(master, name="gpu-job", command=PRINT_42, labels=["linux", "gpu"])
    # The plain worker is free but lacks "gpu": give dispatch a few ticks to (not) pick it.
    wait_for(lambda: master.run_of(run["id"])["status"] == "queued", what="run queued")
    for _ in range(5):
        assert master.run_of(run["id"])["attempts"][0]["status"] == "queued"
        master.api("GET", "workers")  # a round trip, so the ticks have time to pass

    start_agent("gpu-box", labels="linux,gpu")
    run = master.wait_final(run["id"])

    assert run["attempts"][0]["worker"] == "gpu-box"
    assert run["status"] == "succeeded"


def _max_overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_two_agents_with_capacity_two_run_eight_tasks_never_over_capacity(master, start_agent):
    start_agent("agent-a", capacity=2)
    start_agent("agent-b", capacity=2)
    sleeper = f'{sys.executable} -c "import time; time.sleep(0.6)"'
    ids = [
        master.api("POST", "tasks", json={"name": f"job-{i}", "command": sleeper}).json()["id"]
        for i in range(8)
    ]
    samples: list[dict] = []
    stop = threading.Event()

    def sample_slots():
        session = requests.Session()
        while not stop.is_set():
            response = session.get(
                f"{master.url}/api/workers",
                headers={"Authorization": f"Bearer {master.token}"},
                timeout=5,
            )
            samples.extend(response.json()["results"])

    sampler = threading.Thread(target=sample_slots)
    sampler.start()
    try:
        runs = [master.api("POST", f"tasks/{task_id}/run").json()["id"] for task_id in ids]
        finished = [master.wait_final(run_id, timeout=60) for run_id in runs]
    finally:
        stop.set()
        sampler.join()

    assert all(run["status"] == "succeeded" for run in finished)
    per_worker: dict[str, list] = {}
    for run in finished:
        (attempt,) = run["attempts"]
        per_worker.setdefault(attempt["worker"], []).append(
            (_time(attempt["started_at"]), _time(attempt["finished_at"]))
        )
    assert set(per_worker) == {"agent-a", "agent-b"}
    # Agent-side start/finish times: no worker ever ran more than its 2 slots at once.
    assert max(_max_overlap(intervals) for intervals in per_worker.values()) <= 2
    assert samples, "the sampler saw the workers"
    assert max(w["slots_in_use"] for w in samples) <= 2


def test_the_agent_needs_only_the_stdlib_websockets_and_requests():
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party == {"websockets", "requests"}


def test_the_downloaded_agent_runs_tasks_from_another_directory(master, tmp_path):
    source = requests.get(f"{master.url}/agent.py", timeout=5)
    assert source.status_code == 200
    assert source.content == AGENT.read_bytes()
    node = tmp_path / "node"
    node.mkdir()
    (node / "agent.py").write_bytes(source.content)
    token = master.manage("enrollment-token", "--auto-approve")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "agent.py",
            "--server",
            master.url,
            "--token",
            token,
            "--name",
            "remote",
        ],
        cwd=node,
        env={"HOME": str(node), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run = _create_and_run(master, name="remote-job", command=PRINT_42)
        run = master.wait_final(run["id"])
        assert run["attempts"][0]["worker"] == "remote"
        assert run["attempts"][0]["output"] == "42\n"
        # It kept its credential in the default state dir under $HOME.
        assert list(node.glob(".local/state/scheduler-agent/credential.json"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_agent_with_a_bad_enrollment_token_exits_with_a_clear_message(master, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(AGENT),
            "--server",
            master.url,
            "--token",
            "enr_wrong",
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    refusal = "registration refused: enrollment token is unknown, expired, used up or revoked"
    assert refusal in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--capacity", "0"], "capacity"),
        (["--capacity", "many"], "capacity"),
        (["--labels", "a b"], "label"),
        (["--server", "ftp://x"], "server"),
    ],
)
def test_the_agent_refuses_bad_flags_with_exit_code_2(args, message, tmp_path):
    base = {"--server": "http://127.0.0.1:9", "--token": "t", "--state-dir": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    result = subprocess.run(
        [sys.executable, str(AGENT), *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_get_a_clean_environment_and_secrets_never_leave_masked(
    master, start_agent, monkeypatch
):
    # The agent's own environment holds the master's kind of secrets (as under
    # `make run` before): none of them may reach a command.
    monkeypatch.setenv("SECRET_KEY", "the-masters-django-key")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@db/sched")
    monkeypatch.setenv("PASSED_ON", "yes")
    start_agent("agent-1", extra=("--pass-env", "PASSED_ON"))
    secret = "s3cr3t-token-value"
    run = _create_and_run(
        master,
        name="env",
        command='env; echo "token: $API_TOKEN"',
        shell=True,
        env={"GREETING": "hi"},
        secret_env={"API_TOKEN": secret},
    )

    run = master.wait_final(run["id"])

    (attempt,) = run["attempts"]
    names = {line.partition("=")[0] for line in attempt["output"].splitlines()}
    assert {"PATH", "GREETING", "PASSED_ON", "SCHEDULER_RUN_ID"} <= names
    assert not names & {"SECRET_KEY", "DATABASE_URL"}
    assert "API_TOKEN=***" in attempt["output"]
    assert "token: ***" in attempt["output"]
    assert secret not in master.api("GET", f"runs/{run['id']}").text
    assert secret not in master.api("GET", f"runs/{run['id']}/result").text
    assert secret not in master.api("GET", f"tasks/{run['task']}").text
