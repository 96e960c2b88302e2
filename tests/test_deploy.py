"""The deployment files the README points to: the systemd units and the nginx
config. Their commands must be ones the agent and the server accept, the
agent's stop timeout must leave room for its drain, and nginx must take the
config and carry an agent's websocket through it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, free_port, wait_for

AGENT_UNIT = ROOT / "workers_app" / "deploy" / "scheduler-agent.service"
SERVER_UNIT = ROOT / "scheduler_site" / "deploy" / "scheduler-server@.service"
NGINX_CONF = ROOT / "scheduler_site" / "deploy" / "nginx.conf"
README = ROOT / "README.md"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: sections of keys, each key's values in
    order, lines ending in a backslash continued, comment lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_argv(unit: dict, instance: str = "") -> list[str]:
    """ExecStart split like systemd does: ${VAR} of an unset variable is empty
    (the agent's token after enrollment), %i is the instance name."""
    (command,) = unit["Service"]["ExecStart"]
    command = re.sub(r"\$\{\w+\}", "", command).replace("%i", instance)
    return shlex.split(command)


def seconds(value: str) -> float:
    """A systemd time span in the forms used here: 90, 90s, 2min, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def agent_args(argv: list[str]) -> list[str]:
    (script,) = [i for i, arg in enumerate(argv) if arg.endswith("agent.py")]
    return argv[script + 1 :]


# --- the agent's unit ---------------------------------------------------------------


def test_it_starts_the_agent_with_flags_the_agent_accepts():
    from workers_app.agent import build_parser

    args = build_parser().parse_args(agent_args(exec_argv(read_unit(AGENT_UNIT))))

    assert args.servers == ("https://scheduler.example.com",)
    assert args.state_dir == "/var/lib/scheduler-agent"
    # The token comes from SCHEDULER_ENROLLMENT_TOKEN (the EnvironmentFile), not argv.
    assert args.token is None and args.token_file is None


def test_it_gives_the_agent_longer_to_stop_than_its_drain():
    from workers_app.agent import build_parser

    unit = read_unit(AGENT_UNIT)
    args = build_parser().parse_args(agent_args(exec_argv(unit)))
    (stop,) = unit["Service"]["TimeoutStopSec"]

    # The drain, then reporting the killed commands and waiting for the acks.
    assert seconds(stop) >= args.drain_timeout + 15


def test_it_signals_only_the_agent_so_that_it_drains():
    service = read_unit(AGENT_UNIT)["Service"]

    # control-group (the default) would SIGTERM every running command at once.
    assert service["KillMode"] == ["mixed"]
    assert service.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    assert service["Restart"] == ["always"]
    # Exit 2 (bad flags, refused enrollment) and 3 (credential refused) are final.
    assert service["RestartPreventExitStatus"] == ["2 3"]


def test_it_keeps_the_agents_secrets_and_state_out_of_the_unit():
    service = read_unit(AGENT_UNIT)["Service"]

    assert service["EnvironmentFile"] == ["-/etc/scheduler-agent/env"]
    assert service["User"] == ["scheduler-agent"]
    assert service["StateDirectory"] == ["scheduler-agent"]
    assert service["StateDirectoryMode"] == ["0700"]
    # The enrollment token comes from the EnvironmentFile, never the unit itself,
    # and reaches the agent in its environment, not its argv (where ps shows it).
    (command,) = service["ExecStart"]
    assert "--token" not in command
    assert "SCHEDULER_ENROLLMENT_TOKEN" in (AGENT_UNIT.read_text())


# --- the server's unit --------------------------------------------------------------


def test_it_starts_each_server_instance_with_flags_serve_accepts():
    from workers_app.management.commands.serve import Command

    argv = exec_argv(read_unit(SERVER_UNIT), instance="8002")
    assert argv[1:3] == ["manage.py", "serve"]

    options = Command().create_parser("manage.py", "serve").parse_args(argv[3:])

    assert (options.host, options.port) == ("127.0.0.1", 8002)


def test_it_runs_the_server_from_the_checkout_with_shared_settings():
    service = read_unit(SERVER_UNIT)["Service"]
    (directory,) = service["WorkingDirectory"]
    (python,) = exec_argv(read_unit(SERVER_UNIT), instance="8001")[:1]

    assert python == f"{directory}/.venv/bin/python"
    assert service["EnvironmentFile"] == ["/etc/scheduler/env"]
    assert service["Environment"] == ["SCHEDULER_DATA_DIR=/var/lib/scheduler"]
    assert service["Restart"] == ["always"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize(
    ("unit", "name"),
    [(AGENT_UNIT, "scheduler-agent.service"), (SERVER_UNIT, "scheduler-server@8001.service")],
)
def test_systemd_finds_nothing_wrong_with_the_units(tmp_path, unit, name):
    # verify insists that the program exists: point it at this interpreter.
    text = re.sub(r"/opt/\S+/bin/python", sys.executable, unit.read_text())
    (tmp_path / name).write_text(text)

    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert name not in result.stderr, result.stderr


# --- nginx --------------------------------------------------------------------------


def nginx_blocks(text: str) -> dict[str, str]:
    """The body of each `location PATH {` block (they hold no nested block)."""
    return dict(re.findall(r"location\s+(\S+)\s*\{([^}]*)\}", text))


def directive(block: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", block, flags=re.M)


def nginx_seconds(value: str) -> float:
    """An nginx time (30s, 5m, 7d, 1h 30m; a bare number is seconds)."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)(ms|[smhdw]?)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(int(n) * units[u] for n, u in parts if u != "ms")


def test_it_upgrades_websockets_and_keeps_agent_sockets_open_for_hours():
    text = NGINX_CONF.read_text()
    ws = nginx_blocks(text)["/ws/"]

    assert directive(text, "proxy_set_header Upgrade") == ["$http_upgrade"]
    assert directive(text, "proxy_set_header Connection") == ["$scheduler_connection"]
    assert re.search(r"map \$http_upgrade \$scheduler_connection \{[^}]*default upgrade;", text)
    assert directive(text, "proxy_http_version") == ["1.1"]
    assert directive(ws, "proxy_pass") == ["http://scheduler"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directive(ws, timeout)
        assert nginx_seconds(value) >= 3600, f"{timeout} {value}"


def test_it_passes_the_clients_host_and_spreads_over_several_servers():
    text = NGINX_CONF.read_text()
    upstream = re.search(r"upstream scheduler \{([^}]*)\}", text).group(1)

    assert directive(text, "proxy_set_header Host") == ["$host"]
    assert directive(text, "proxy_set_header X-Forwarded-Proto") == ["$scheme"]
    assert len(directive(upstream, "server")) >= 2
    assert directive(nginx_blocks(text)["/"], "proxy_pass") == ["http://scheduler"]


def test_the_readme_names_the_files_that_are_here():
    named = set(re.findall(r"`((?:scheduler_site|workers_app)/deploy/[^`]+)`", README.read_text()))

    assert {str(p.relative_to(ROOT)) for p in (AGENT_UNIT, SERVER_UNIT, NGINX_CONF)} <= named
    assert all((ROOT / path).is_file() for path in named), named


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.fixture
def nginx_bin() -> str:
    """Debian's nginx (.ci/run installs nginx-light); CI fails without it."""
    if NGINX is None:
        message = "nginx is missing: apt-get install nginx-light"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: failing instead of skipping)", pytrace=False)
        pytest.skip(message)
    return NGINX


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def local_nginx(tmp_path: Path, *, upstream_ports: list[int], http: int, https: int) -> Path:
    """The shipped config inside a main config of our own (pid, logs and temp
    files under tmp_path), with its addresses and certificate swapped for local
    ones: everything else is the file as shipped."""
    cert, key = self_signed(tmp_path)
    site = NGINX_CONF.read_text()
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in upstream_ports)
    site = re.sub(r"(    server 127\.0\.0\.1:\d+[^\n]*\n)+", servers, site)
    site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)  # no IPv6 here, maybe
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http};")
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;")
    site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    (tmp_path / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log {tmp_path}/access.log;\n{temp}\n"
        f"    include {tmp_path}/site.conf;\n}}\n"
    )
    return main


def test_nginx_accepts_the_config(tmp_path, nginx_bin):
    main = local_nginx(tmp_path, upstream_ports=[free_port(), free_port()], http=1, https=2)

    result = subprocess.run(
        [nginx_bin, "-t", "-c", str(main)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.e2e
def test_an_agent_enrolls_and_runs_a_command_through_nginx(
    tmp_path, monkeypatch, nginx_bin, master, start_agent
):
    https = free_port()
    main = local_nginx(tmp_path, upstream_ports=[master.port], http=free_port(), https=https)
    nginx = subprocess.Popen(
        [nginx_bin, "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        front = f"https://127.0.0.1:{https}"
        cert = str(tmp_path / "cert.pem")
        # The agent trusts our certificate: requests (enrollment) and ssl (the socket).
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        import requests

        def answers() -> bool:
            assert nginx.poll() is None, nginx.stderr.read().decode()
            try:
                return requests.get(f"{front}/login/", verify=cert, timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(answers, what="nginx in front of the server")
        spawn = start_agent(name="behind-nginx", server=front)
        task = master.create_task(name="proxied", command="echo through nginx")

        run = master.wait_final(master.trigger(task["id"])["id"])

        assert run["status"] == "succeeded"
        assert run["attempts"][0]["worker"] == "behind-nginx"
        assert run["attempts"][0]["stdout"] == "through nginx\n"
        assert f"connected to wss://127.0.0.1:{https}/ws/agent/" in spawn.log()
        spawn.stop()  # nginx logs a websocket when it closes
        wait_for(
            lambda: '"GET /ws/agent/ HTTP/1.1" 101' in (tmp_path / "access.log").read_text(),
            what="the agent's socket in nginx's access log",
        )
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
