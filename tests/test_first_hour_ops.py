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
import tomllib
from pathlib import Path

import pytest
import requests

from tests.harness import AGENT, ROOT, wait_for
from workers_app import enrollment
from workers_app.models import EnrollmentToken

# What a freshly installed Debian/Ubuntu node has on its PATH: no pyenv, no
# project venv, so `python3` is the distribution's (PEP 668 "externally managed").
STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Besides HOME and PATH, only what reaches the network the way the machine does.
PASS_THROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


# --- 1. the Add worker command ------------------------------------------------------


def _shown_command(session: requests.Session, master, name: str = "") -> str:
    """Click *Add worker* over HTTP, as the page's form does, and read the command shown."""
    page = session.post(
        f"{master.url}/workers/add/",
        data={"name": name, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": f"{master.url}/workers/"},
    )
    assert page.status_code == 200, page.text
    shown = re.search(r'<pre class="command" id="enroll-command">([^<]+)</pre>', page.text)
    return html.unescape(shown.group(1))


def _logged_in(master) -> requests.Session:
    session = requests.Session()
    session.get(f"{master.url}/login/")
    password = (master.data_dir / "admin-password.txt").read_text().strip()
    landed = session.post(
        f"{master.url}/login/",
        data={
            "username": "admin",
            "password": password,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
    )
    assert landed.url.endswith("/tasks/"), landed.text
    return session


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
    session = _logged_in(master)
    home = tmp_path / "node-home"
    named = _run_on_stock_node(
        _shown_command(session, master, name="edge-7"), home, tmp_path / "node-1.log"
    )
    # Two more "nodes" with the same host name (separate state dirs), the name left empty.
    twins = [
        _run_on_stock_node(
            _shown_command(session, master),
            home,
            tmp_path / f"twin-{n}.log",
            SCHEDULER_AGENT_STATE_DIR=str(tmp_path / f"twin-{n}-state"),
        )
        for n in (1, 2)
    ]
    procs = [named, *twins]
    try:

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
        "~/.local/share/scheduler-agent/bin/python ~/.local/share/scheduler-agent/agent.py",
        "  --server http://m.example:8000",
        "  --token enr_abc",
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
