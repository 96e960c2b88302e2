"""Moving an install from SQLite to PostgreSQL keeps its whole history.

A real server on SQLite builds history with a real agent; then the commands
of the README's "Moving from SQLite to PostgreSQL" block run exactly as
written (the example URL swapped for a database of the test's own), and the
same server code on PostgreSQL must answer the same, take new work under new
ids, and accept the agent's credential and the API token minted before.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.engines import create_database, drop_database, libpq
from tests.harness import FAST_SETTINGS, ROOT, Master, free_port, spawn_agent, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.scale_out]

README = ROOT / "README.md"
EXAMPLE_URL = "postgres://scheduler:PASSWORD@db.example.com:5432/scheduler"
# Settings that would put the old server on the real engines, not its SQLite file.
ENGINE_VARIABLES = ("DATABASE_URL", "DATABASE_URL_FILE", "REDIS_URL", "REDIS_URL_FILE")


def readme_move_commands() -> list[str]:
    """The command lines of the README's block marked for this test."""
    text = README.read_text()
    match = re.search(
        r"<!-- tested by tests/test_move_to_postgres\.py -->\s*```sh\n(.*?)```", text, re.S
    )
    assert match, "README: the move's command block (marked for this test) is missing"
    lines = [line.split("  #")[0].strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run_documented(line: str, env: dict[str, str], database_url: str) -> str:
    """One README line: leading NAME=value words are its environment."""
    words = shlex.split(line)
    env = dict(env)
    while "=" in words[0] and not words[0].startswith("."):
        name, _, value = words.pop(0).partition("=")
        env[name] = database_url if value == EXAMPLE_URL else value
    assert words[:2] == [".venv/bin/python", "manage.py"], line
    result = subprocess.run(
        [sys.executable, *words[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def dump_everything(env: dict[str, str]) -> list[dict]:
    """Every row of every model, through Django, sorted."""
    result = subprocess.run(
        [sys.executable, "manage.py", "dumpdata", "--format", "jsonl"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return sorted(rows, key=lambda row: (row["model"], json.dumps(row["pk"])))


def history(server: Master) -> dict:
    """What the API says about everything, output included."""
    runs = server.api("GET", "runs", params={"limit": 200}).json()
    assert runs["next"] is None
    tasks = server.api("GET", "tasks", params={"limit": 200}).json()
    assert tasks["next"] is None
    workers = server.api("GET", "workers").json()["results"]
    return {
        "runs": {run["id"]: server.run_of(run["id"]) for run in runs["results"]},
        "tasks": tasks["results"],
        "workers": [
            {k: w[k] for k in ("id", "name", "hostname", "labels", "capacity", "revoked")}
            for w in workers
        ],
    }


@pytest.fixture
def database_url():
    url = create_database()
    yield url
    drop_database(url)


def test_it_moves_every_run_task_worker_and_token_to_postgresql(tmp_path, database_url):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_VARIABLES}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(FAST_SETTINGS, SCHEDULER_DATA_DIR=str(data_dir))
    env.pop("SCHEDULER_REDIS_PREFIX", None)
    port = free_port()
    old = Master(url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, env=env)
    new = None
    agent = None
    try:
        old.manage("migrate", "-v0")
        old.manage("ensureadmin")
        old.token = old.manage("apitoken", "admin")
        old.start()
        agent = spawn_agent(
            old.url, old.manage("enrollment-token", "--auto-approve"), tmp_path, name="node-a"
        )
        wait_for(lambda: old.worker_state("node-a") == "online", what="node-a online")

        # --- history on SQLite, made by the real server and agent -----------------
        hello = old.create_task(
            name="hello",
            command="python3 -c \"import sys; print('héllo ✓'); print('oops', file=sys.stderr)\"",
            env={"GREETING": "hi"},
        )
        hello_run = old.wait_final(old.trigger(hello["id"])["id"])
        assert hello_run["attempts"][0]["stdout"] == "héllo ✓\n"
        nul = old.create_task(name="nul", command=r"printf 'a\000b\n'", shell=True)
        nul_run = old.wait_final(old.trigger(nul["id"])["id"])
        assert nul_run["attempts"][0]["stdout"] == "a\x00b\n"
        fails = old.create_task(name="fails", command="exit 3", shell=True, max_retries=1)
        old.api("PATCH", f"tasks/{fails['id']}", json={"retry_backoff_s": 0})
        failed = old.wait_final(old.trigger(fails["id"])["id"])
        assert [a["exit_code"] for a in failed["attempts"]] == [3, 3]
        retried = old.api("POST", f"runs/{failed['id']}/retry").json()
        old.wait_final(retried["id"])
        sharded = old.create_task(
            name="sharded",
            command="echo shard $SCHEDULER_SHARD_INDEX",
            shell=True,
            shards=2,
            merge_command="cat",
        )
        sharded_run = old.wait_final(old.trigger(sharded["id"])["id"])
        assert sharded_run["status"] == "succeeded", sharded_run
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        delayed = old.api("POST", f"tasks/{hello['id']}/run", json={"run_at": later}).json()
        assert old.api("POST", f"runs/{delayed['id']}/cancel").status_code == 200
        old.create_task(
            name="nightly", command="true", schedule="30 2 * * *", timezone="Europe/Paris"
        )
        doomed = old.create_task(name="doomed", command="echo bye")
        old.wait_final(old.trigger(doomed["id"])["id"])
        assert old.api("DELETE", f"tasks/{doomed['id']}").status_code == 204
        assert old.api("POST", "scheduler/pause").status_code == 200
        assert old.api("POST", "scheduler/resume").status_code == 200
        result = old.api("GET", f"runs/{sharded_run['id']}/result").text
        assert result == "shard 0\nshard 1\n"
        before = history(old)
        worker_id = before["workers"][0]["id"]
        old.stop()  # the agent goes on, reconnecting: it is on another node

        # --- the README's commands -------------------------------------------------
        outputs = [run_documented(line, env, database_url) for line in readme_move_commands()]
        assert "copied " in outputs[-1]
        assert "tasks_app.LogChunk: 1 rows held NUL characters" in outputs[-1]

        # Every row of every model, as Django reads it back (dumpdata keeps times
        # to the millisecond; the API comparison below checks microseconds).
        on_sqlite = dump_everything(env)
        on_postgres = dump_everything({**env, "DATABASE_URL": database_url})
        nul_chunk = next(
            r
            for r in on_sqlite
            if r["model"] == "tasks_app.logchunk" and "\x00" in r["fields"]["data"]
        )
        nul_chunk["fields"]["data"] = nul_chunk["fields"]["data"].replace("\x00", "\ufffd")
        # Workers arrive disconnected: the old server's sockets mean nothing to the
        # new one, and each agent's next hello brings its worker back online.
        for row in on_sqlite:
            if row["model"] == "workers_app.worker":
                assert row["fields"]["channel_name"] and row["fields"]["state"] == "online"
                row["fields"] |= {"channel_name": "", "server": "", "state": "offline"}
        assert len(on_postgres) == len(on_sqlite)
        assert on_postgres == on_sqlite

        # Every sequence is past the highest id it gave out on SQLite.
        import psycopg

        with psycopg.connect(libpq(database_url)) as conn:
            tables = conn.execute(
                "SELECT table_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND column_name = 'id'"
                " AND (is_identity = 'YES' OR column_default LIKE 'nextval%')"
            ).fetchall()
            assert len(tables) > 10
            for (table,) in tables:
                (highest,) = conn.execute(f'SELECT COALESCE(MAX(id), 0) FROM "{table}"').fetchone()
                (following,) = conn.execute(
                    "SELECT nextval(pg_get_serial_sequence(%s, 'id'))", (table,)
                ).fetchone()
                assert following > highest, table

        # --- the same install on PostgreSQL ------------------------------------------
        new = Master(
            url=old.url,
            port=port,
            data_dir=data_dir,
            env={**env, "DATABASE_URL": database_url},
            token=old.token,  # minted on SQLite
        )
        new.start()
        after = history(new)
        moved_nul = after["runs"][nul_run["id"]]["attempts"][0]
        assert moved_nul["stdout"] == moved_nul["output"] == "a\ufffdb\n"
        # PostgreSQL's text cannot hold NUL: the copy stores U+FFFD instead.
        before["runs"][nul_run["id"]]["attempts"][0].update(
            stdout="a\ufffdb\n", output="a\ufffdb\n"
        )
        before["runs"][nul_run["id"]]["result"] = "a\ufffdb\n"
        assert sorted(after["runs"]) == sorted(before["runs"])
        for run_id, run in before["runs"].items():
            assert after["runs"][run_id] == run
        assert after == before
        assert new.api("GET", f"runs/{sharded_run['id']}/result").text == result
        assert new.api("GET", "scheduler").json()["paused"] is False

        # The agent that never stopped comes back with its credential, as the same worker.
        connected = f"connected as worker {worker_id} (node-a)"
        wait_for(lambda: agent.log().count(connected) >= 2, timeout=40, what="node-a back")

        # New work takes new ids and runs there.
        run = new.wait_final(new.trigger(hello["id"])["id"])
        assert run["id"] > max(before["runs"])
        highest_attempt = max(a["id"] for r in before["runs"].values() for a in r["attempts"])
        assert run["attempts"][0]["id"] > highest_attempt
        assert run["status"] == "succeeded", run
        assert run["attempts"][0]["worker"] == "node-a"
        assert run["attempts"][0]["stdout"] == "héllo ✓\n"
        task = new.create_task(name="new-on-postgres", command="true")
        assert task["id"] > max(t["id"] for t in before["tasks"]) + 1  # doomed's id is kept
    finally:
        if agent is not None:
            agent.stop()
        if new is not None:
            new.stop()
        old.stop()


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """An install on SQLite in a data dir of its own, whatever the test run uses."""
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_VARIABLES}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(SCHEDULER_DATA_DIR=str(tmp_path / "data"))
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_it_refuses_a_database_that_is_not_empty(tmp_path, database_url):
    env = sqlite_env(tmp_path)
    on_postgres = {**env, "DATABASE_URL": database_url}
    for environment in (env, on_postgres):
        manage(environment, "migrate", "-v0")
    manage(on_postgres, "ensureadmin")

    result = manage(on_postgres, "copy-from-sqlite")

    assert result.returncode == 1
    assert result.stderr.strip() == (
        "CommandError: nothing copied: the PostgreSQL database is not empty (auth.User has"
        " rows); copy into a new database"
    )


def test_it_refuses_to_copy_into_sqlite(tmp_path):
    env = sqlite_env(tmp_path)
    manage(env, "migrate", "-v0")

    result = manage(env, "copy-from-sqlite")

    assert result.returncode == 1
    assert "the target is not PostgreSQL: set DATABASE_URL" in result.stderr
    assert Path(tmp_path / "data" / "db.sqlite3").exists()


def test_it_refuses_while_a_server_runs_on_the_sqlite_file(tmp_path, database_url):
    old = Master.launch(tmp_path / "old")  # on SQLite: this file runs in `make test` only
    try:
        on_postgres = {**old.env, "DATABASE_URL": database_url}
        manage(on_postgres, "migrate", "-v0")

        result = manage(on_postgres, "copy-from-sqlite")
    finally:
        old.release()

    assert result.returncode == 1
    assert re.fullmatch(
        r"CommandError: nothing copied: a server is still running on the SQLite file \(\S+,"
        rf" serving 127\.0\.0\.1:{old.port}\); pause the scheduler, stop the server, then copy",
        result.stderr.strip(),
    ), result.stderr


def test_it_cuts_a_text_longer_than_its_column_and_says_so(tmp_path, database_url):
    env = sqlite_env(tmp_path)
    on_postgres = {**env, "DATABASE_URL": database_url}
    for environment in (env, on_postgres):
        manage(environment, "migrate", "-v0")
    # What an older version stored: a failed broadcast's reason naming many labels
    # (SQLite does not enforce a column's length).
    long_reason = "broadcast: no online worker with the labels " + ",".join(["x" * 60] * 20)
    script = (
        "from tasks_app.models import Run, Task\n"
        "t = Task.objects.create(name='wide', command='true')\n"
        f"Run.objects.create(task=t, task_name=t.name, definition=t.definition(),"
        f" status='failed', reason={long_reason!r})\n"
    )
    assert manage(env, "shell", "-v", "0", "-c", script).returncode == 0

    result = manage(on_postgres, "copy-from-sqlite")

    assert result.returncode == 0, result.stderr
    assert (
        "tasks_app.Run: 1 rows held a text longer than its column allows, cut to fit"
        " (SQLite does not enforce the length)"
    ) in result.stdout
    import psycopg

    with psycopg.connect(libpq(database_url)) as conn:
        [(reason,)] = conn.execute("SELECT reason FROM tasks_app_run").fetchall()
    assert reason == long_reason[:500]
