"""Issue 7, the first hour: what a new user trips on (operations side).

The *Add worker* command run for real on a stock node, README commands that
work as printed, `make token`, clear errors for empty or malformed settings,
and `make run`'s login banner after everything else.
"""

from __future__ import annotations

import ast
import html
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import requests

from tests.harness import AGENT, ROOT, free_port, own_engines, wait_for
from workers_app import enrollment
from workers_app.models import EnrollmentToken

# What a freshly installed Debian/Ubuntu node has on its PATH: no pyenv, no
# project venv, so `python3` is the distribution's (PEP 668 "externally managed").
STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Besides HOME and PATH, only what reaches the network the way the machine does.
PASS_THROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


# --- 1. the Add worker command ------------------------------------------------------


def _shown_command(session: requests.Session, master, name: str = "", **options: str) -> str:
    """Click *Add worker* over HTTP, as the page's form does, and read the command shown."""
    page = session.post(
        f"{master.url}/workers/add/",
        data={"name": name, "csrfmiddlewaretoken": session.cookies["csrftoken"], **options},
        headers={"Referer": f"{master.url}/workers/"},
    )
    assert page.status_code == 200, page.text
    shown = re.search(r'<pre class="command" id="enroll-command">([^<]+)</pre>', page.text)
    return html.unescape(shown.group(1))


def _run_on_stock_node(command: str, home: Path, log: Path, **env: str) -> subprocess.Popen:
    """Paste the command into bash on a "node": its own HOME, a stock PATH."""
    home.mkdir(parents=True, exist_ok=True)
    clean = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    clean |= {"HOME": str(home), "PATH": STOCK_PATH, "LANG": "C.UTF-8", **env}
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=home,
            env=clean,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the agent is its grandchild: stop the whole group
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _worker_names(master) -> set[str]:
    return {w["name"] for w in master.api("GET", "workers").json()["results"]}


@pytest.mark.e2e
def test_it_runs_the_add_worker_command_as_shown_on_a_stock_node(master, tmp_path):
    """The command text from the page, run by bash with nothing but the stock PATH.

    pip reaches PyPI (as it will on a real node): a local wheel dir would
    prove less, since installing the pinned requirements from the index is
    exactly what broke on Debian. The venv and pip cache live in the fake
    HOME, so the second and third nodes reuse them.
    """
    session = master.logged_in()
    home = tmp_path / "node-home"
    named = _run_on_stock_node(
        _shown_command(session, master, name="edge-7"), home, tmp_path / "node-1.log"
    )
    procs = [named]
    try:
        # The first node builds the venv; the twins start once it is online, so
        # they reuse it instead of racing it for the same directory. Its token
        # (the form's defaults: one use, no auto-approve) leaves it pending.
        wait_for(
            lambda: named.poll() is None and master.worker_state("edge-7") == "pending",
            timeout=180,
            interval=0.5,
            what="the first node enrolled, pending approval",
        )
        (agent_argv,) = [
            argv
            for argv in _argvs()
            if "edge-7" in argv and any(a.endswith("/agent.py") for a in argv)
        ]
        assert not any(a.startswith("enr_") or "--token" in a for a in agent_argv), agent_argv
        [edge] = [
            w for w in master.api("GET", "workers").json()["results"] if w["name"] == "edge-7"
        ]
        approved = master.api("POST", f"workers/{edge['id']}/approve", json={"labels": ["edge"]})
        assert approved.status_code == 200, approved.text
        wait_for(
            lambda: named.poll() is None and master.worker_state("edge-7") == "online",
            timeout=60,
            interval=0.5,
            what="the first node online once approved",
        )
        # Two more "nodes" with the same host name (separate state dirs), the name
        # left empty; one after the other, since they share this fake HOME: the
        # command's curl rewrites agent.py, which a node starting at that very
        # moment would read empty (real nodes have a HOME each).
        for n in (1, 2):
            procs.append(
                _run_on_stock_node(
                    _shown_command(session, master, auto_approve="on"),
                    home,
                    tmp_path / f"twin-{n}.log",
                    SCHEDULER_AGENT_STATE_DIR=str(tmp_path / f"twin-{n}-state"),
                )
            )
            wait_for(
                lambda n=n: (
                    procs[n].poll() is None
                    and sum(
                        w["state"] == "online"
                        for w in master.api("GET", "workers").json()["results"]
                    )
                    == n + 1
                ),
                timeout=120,
                interval=0.5,
                what=f"twin {n} online",
            )

        def online():
            for proc, log in zip(procs, ["node-1", "twin-1", "twin-2"], strict=True):
                assert proc.poll() is None, (tmp_path / f"{log}.log").read_text()
            workers = master.api("GET", "workers").json()["results"]
            return len([w for w in workers if w["state"] == "online"]) == 3 and workers

        workers = wait_for(online, timeout=180, interval=0.5, what="three agents online")
        names = sorted(w["name"] for w in workers)
        twin_names = [n for n in names if n != "edge-7"]
        host = re.escape(socket.gethostname())
        assert "edge-7" in names
        assert len(twin_names) == 2, names
        assert all(re.fullmatch(rf"{host}-[0-9a-f]{{4}}", n) for n in twin_names), names
        assert (home / ".local/share/scheduler-agent/bin/python").exists()
        assert (home / ".local/state/scheduler-agent/credential.json").exists()
    finally:
        for proc in procs:
            _stop(proc)


def _argvs() -> list[list[str]]:
    """Every process's command line, as `ps` shows it to any user."""
    argvs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            argvs.append(raw.decode("utf-8", "replace").split("\0"))
    return argvs


def test_the_command_installs_exactly_the_agents_third_party_imports():
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    pinned = dict(re.match(r"([a-z]+)(.*)", r).groups() for r in enrollment.AGENT_REQUIREMENTS)

    assert third_party == set(pinned)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"{name}{bound}" for name, bound in pinned.items()} <= set(project)


def test_it_quotes_the_typed_name_and_keeps_one_step_per_line():
    command = enrollment.agent_command("http://m.example:8000", "enr_abc", name="node@rack-2")

    lines = command.split(" \\\n")
    assert lines == [
        "python3 -m venv ~/.local/share/scheduler-agent &&",
        "~/.local/share/scheduler-agent/bin/pip install -q 'websockets>=13.0' 'requests>=2.31' &&",
        "curl -fsSL -o ~/.local/share/scheduler-agent/agent.py http://m.example:8000/agent.py &&",
        "(cd ~/.local/share/scheduler-agent &&"
        f" echo '{enrollment.agent_sha256()}  agent.py' | sha256sum -c --quiet -) &&",
        "SCHEDULER_ENROLLMENT_TOKEN=enr_abc",
        "  ~/.local/share/scheduler-agent/bin/python ~/.local/share/scheduler-agent/agent.py",
        "  --server http://m.example:8000",
        "  --name node@rack-2",
        "  --capacity 4",
    ]


@pytest.mark.django_db
def test_it_refuses_a_name_the_registration_would_refuse_and_mints_nothing(bob_client):
    response = bob_client.post("/workers/add/", {"name": "two words"}, headers={"HX-Request": "1"})

    body = response.content.decode()
    assert '<p class="field-error" data-field="name">Worker name: Use 1-200 letters, digits' in body
    assert 'id="enroll-command"' not in body
    assert EnrollmentToken.objects.count() == 0


# --- 2. README commands work as printed; make token --------------------------------

# A project command that needs the venv's Python: `python manage.py ...`,
# `python3 tests/bench.py`, or `manage.py ...` run directly.
NEEDS_VENV = re.compile(r"^(?:python3?\s+)?(?:\./)?manage\.py\s|^python3?\s+tests/")
# In prose, `manage.py serve` names a process; only a span starting with python is a command.
NEEDS_VENV_INLINE = re.compile(r"^python3?\s+(?:\./)?manage\.py\s|^python3?\s+tests/")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each README command that needs the project's venv."""

    def line_of(offset: int) -> int:  # the same in text and prose
        return text.count("\n", 0, offset) + 1

    def split(piece: str) -> list[str]:
        # Each command of a chain or substitution: a && b, a; b, a | b, $(a).
        return [c.strip() for c in re.split(r"&&|;|\||\$\(", piece)]

    found = []
    for block in FENCED.finditer(text):
        for number, line in enumerate(block.group(1).splitlines(), line_of(block.start(1))):
            found += [(number, c) for c in split(line) if NEEDS_VENV.match(c)]
    # Blocks blanked out character for character, so that offsets stay put.
    prose = FENCED.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    for span in re.finditer(r"`([^`]+)`", prose):
        code = " ".join(span.group(1).split())  # a span may wrap onto the next line
        found += [(line_of(span.start()), c) for c in split(code) if NEEDS_VENV_INLINE.match(c)]
    return sorted(found)


def test_every_readme_command_runs_without_an_activated_venv():
    bare = [f"README.md:{n}: {c}" for n, c in _readme_commands((ROOT / "README.md").read_text())]

    assert bare == [], "use .venv/bin/python (or a make target):\n" + "\n".join(bare)


def test_the_readme_check_sees_commands_in_blocks_chains_and_inline_code():
    # The scanner itself, on lines like the ones the README had.
    readme = (
        "Start `manage.py serve` with\n`python manage.py\nserve`.\n"
        "```sh\nT=$(python manage.py apitoken admin)\nmake run && manage.py check\n"
        ".venv/bin/python manage.py seedruns 10\n```\n"
    )

    assert _readme_commands(readme) == [
        (2, "python manage.py serve"),
        (5, "python manage.py apitoken admin)"),
        (6, "manage.py check"),
    ]


def test_make_token_prints_a_token_that_the_api_accepts(master):
    env = master.env  # its data dir, and its own database on PostgreSQL

    made = subprocess.run(
        ["make", "-s", "token", "USER=admin"], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert re.fullmatch(r"api_[\w-]+", token), made.stdout
    answer = requests.get(
        f"{master.url}/api/scheduler", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    assert answer.status_code == 200
    assert answer.json()["paused"] is False


def test_make_token_names_the_user_it_cannot_find(master):
    env = master.env

    made = subprocess.run(
        ["make", "-s", "token", "USER=nobody"], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert made.returncode != 0
    assert "no active user named 'nobody'" in made.stderr
    assert made.stdout == ""


# --- 3. settings from the environment: set but empty, or malformed -----------------


def _check(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """`manage.py check` in a real process with these variables on top of a clean data dir."""
    full = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path / "data"), **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=full, capture_output=True, text=True
    )


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "staticfiles.E002" not in result.stderr
    return (
        result.stderr.strip()
        .splitlines()[-1]
        .removeprefix("django.core.exceptions.ImproperlyConfigured: ")
    )


def test_an_empty_data_dir_says_so_instead_of_staticfiles_e002(tmp_path):
    assert _error(_check(tmp_path, SCHEDULER_DATA_DIR="")) == (
        "SCHEDULER_DATA_DIR is set but empty: unset it to use the default"
        f" ({ROOT / '.scheduler'}) or give a value"
    )


def test_a_data_dir_that_is_the_project_itself_is_named(tmp_path):
    assert _error(_check(tmp_path, SCHEDULER_DATA_DIR=str(ROOT))) == (
        f"SCHEDULER_DATA_DIR: {ROOT} is the project directory; choose a directory of its own,"
        " e.g. the default .scheduler/"
    )
    assert not (ROOT / "secret_key").exists()  # nothing was written into the project


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "plain-file").write_text("")

    assert _error(_check(tmp_path, SCHEDULER_DATA_DIR=str(tmp_path / "plain-file"))) == (
        f"SCHEDULER_DATA_DIR: {tmp_path / 'plain-file'} exists and is not a directory"
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "SCHEDULER_ALLOWED_HOSTS",
            "",
            "SCHEDULER_ALLOWED_HOSTS is set but empty: unset it to use the default"
            " (127.0.0.1,localhost,[::1]) or give a value",
        ),
        (
            "SCHEDULER_ALLOWED_HOSTS",
            " , ",
            "SCHEDULER_ALLOWED_HOSTS names no host; unset it for the default",
        ),
        (
            "SCHEDULER_ALLOWED_HOSTS",
            "localhost,http://sched.example:8000",
            "SCHEDULER_ALLOWED_HOSTS: 'http://sched.example:8000' is not a host name"
            " (just sched.example)",
        ),
        (
            "SCHEDULER_DEBUG",
            " ",
            "SCHEDULER_DEBUG is set but empty: unset it to use the default (false) or give a value",
        ),
        (
            "SCHEDULER_HEARTBEAT_S",
            "nan",
            "SCHEDULER_HEARTBEAT_S must be a number, not 'nan'",
        ),
        (
            "SCHEDULER_PAGE_SIZE",
            "",
            "SCHEDULER_PAGE_SIZE is set but empty: unset it to use the default (50)"
            " or give a value",
        ),
        (
            "SCHEDULER_TIME_ZONE",
            "Europe/Pariss",
            "SCHEDULER_TIME_ZONE: unknown time zone 'Europe/Pariss'; use an IANA name such as"
            " UTC or Europe/Paris",
        ),
        (
            "SCHEDULER_LOG_LEVEL",
            "verbose",
            "SCHEDULER_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL,"
            " not 'VERBOSE'",
        ),
        (
            "SCHEDULER_PUBLIC_URL",
            "sched.example:8000",
            "SCHEDULER_PUBLIC_URL must be an http:// or https:// URL such as"
            " http://master.example:8000, not 'sched.example:8000'",
        ),
        (
            "SECRET_KEY",
            "",
            "SECRET_KEY is set but empty: unset it to use the default (a key generated once into"
            " the data dir) or give a value",
        ),
        (
            "DATABASE_URL",
            "",
            "DATABASE_URL is set but empty: unset it to use the default (SQLite in the data dir)"
            " or give a value",
        ),
        (
            "DATABASE_URL",
            "mysql://scheduler@db.example/scheduler",
            "DATABASE_URL must be a postgres:// URL such as"
            " postgres://USER:PASSWORD@HOST:5432/NAME (unset it for the embedded SQLite),"
            " not a mysql URL",
        ),
        (
            "DATABASE_URL",
            "postgres://scheduler@db.example:5432",
            "DATABASE_URL names no database: add /NAME at the end",
        ),
        (
            "REDIS_URL",
            "http://127.0.0.1:6379",
            "REDIS_URL must be a redis://HOST:6379/DB (or rediss://, unix://) URL,"
            " not 'http://127.0.0.1:6379'",
        ),
        (
            "REDIS_URL",
            "redis://127.0.0.1:6379/first",
            "REDIS_URL: 'redis://127.0.0.1:6379/first' has an invalid port or db number",
        ),
        (
            "SCHEDULER_DB_POOL_SIZE",
            "-1",
            "SCHEDULER_DB_POOL_SIZE must be at least 0, not '-1'",
        ),
    ],
)
def test_a_malformed_or_empty_variable_stops_check_with_its_name(tmp_path, name, value, message):
    assert _error(_check(tmp_path, **{name: value})) == message


def test_an_empty_secret_key_file_is_refused(tmp_path):
    (tmp_path / "secret").write_text("\n")

    assert _error(_check(tmp_path, SECRET_KEY_FILE=str(tmp_path / "secret"))) == (
        f"SECRET_KEY_FILE: {tmp_path / 'secret'} is empty"
    )


def test_variables_whose_default_is_empty_may_be_set_empty(tmp_path):
    result = _check(tmp_path, SCHEDULER_PUBLIC_URL="", SCHEDULER_CSRF_TRUSTED_ORIGINS="")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "System check identified no issues (0 silenced)."


# --- 4. make run's banner comes last, in one piece ---------------------------------


@pytest.mark.e2e
def test_runlocal_prints_the_login_banner_last_and_in_one_piece(tmp_path, request):
    port = free_port()
    env = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    owned = own_engines(env)  # on PostgreSQL, a database of its own as for any server
    if owned is not None:
        request.addfinalizer(owned.drop)
    lines: list[str] = []
    runlocal = subprocess.Popen(
        [sys.executable, "manage.py", "runlocal", "--port", str(port), "--agents", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one terminal, as under `make run`
        text=True,
    )
    reader = threading.Thread(target=lambda: lines.extend(runlocal.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines.count("=" * 64 + "\n") == 2, timeout=60, what="the banner")
    finally:
        runlocal.send_signal(signal.SIGINT)
        runlocal.wait(timeout=30)
        reader.join(timeout=5)
    output = [line.rstrip("\n") for line in lines]

    password = (tmp_path / "admin-password.txt").read_text().strip()
    banner = [
        "=" * 64,
        f"  Scheduler is ready: http://127.0.0.1:{port}/",
        f"  Log in:   admin / {password}",
        f"            (the password is kept in {tmp_path / 'admin-password.txt'})",
        "  Agents:   local-1, local-2 connected, 4 slots each",
        "  API:      `make token` prints a token for the JSON API",
        "  Stop:     Ctrl-C (running commands get 5 s to finish)",
        "=" * 64,
    ]
    top = output.index(banner[0])
    assert output[top - 1 : top + len(banner) + 1] == ["", *banner, ""], "\n".join(output)
    assert output.index(f"serving on http://127.0.0.1:{port}/") < top
    for name in ("local-1", "local-2"):
        connected = [i for i, line in enumerate(output) if line.endswith(f"({name})")]
        # Its first connection: on a loaded machine an agent may also reconnect
        # later (a missed heartbeat while the test shuts down), which is no
        # business of the banner's.
        assert connected and min(connected) < top, f"{name} connected after the banner"
    assert output[-1] == "stopped."
    assert runlocal.returncode == 0


def test_the_readme_shows_the_command_the_page_shows():
    shown = enrollment.agent_command("http://MASTER:8000", "enr_X").replace("enr_X", "enr_…")
    shown = shown.replace(enrollment.agent_sha256(), "<sha256 of agent.py>")

    assert f"```sh\n{shown}\n```" in (ROOT / "README.md").read_text()
