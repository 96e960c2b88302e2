"""Hardened defaults (issue 10): the documented production settings pass
Django's deployment check, request bodies are capped before they are read,
deeply nested JSON is a 400.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys

import pytest

from tests.harness import ROOT

# --- production settings: manage.py check --deploy -----------------------------------


def _production_env() -> dict[str, str]:
    """The variables of the README's production env file, as systemd reads them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Settings, the same on every server", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    env = {}
    for line in block.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def _check_deploy(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path / "data"), **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
    )


def test_the_documented_production_settings_pass_check_deploy(tmp_path):
    env = _production_env()
    assert env["SCHEDULER_HTTPS"] == "true"  # the block is the one we think it is
    # The README's placeholder, replaced as its comment says to.
    assert env["SECRET_KEY"] == "..."
    env["SECRET_KEY"] = secrets.token_urlsafe(50)

    result = _check_deploy(tmp_path, env)

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNINGS" not in result.stderr


def test_check_deploy_warns_about_the_laptop_defaults(tmp_path):
    """The test above can fail: without the production variables, it does."""
    result = _check_deploy(tmp_path, {})

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


def test_https_without_the_proxy_header_is_refused(tmp_path):
    full = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path / "data"), "SCHEDULER_HTTPS": "true"}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=full, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SCHEDULER_HTTPS=true needs"
        " SCHEDULER_PROXY_SSL_HEADER (e.g. X-Forwarded-Proto), the header the proxy that ends"
        " TLS sets: without it every request looks like plain http and would be redirected to"
        " https again and again"
    )


@pytest.mark.parametrize("value", ["HTTP_X_FORWARDED_PROTO", "X-Forwarded-Proto: https"])
def test_a_proxy_header_that_is_not_a_header_name_is_refused(tmp_path, value):
    full = {
        **os.environ,
        "SCHEDULER_DATA_DIR": str(tmp_path / "data"),
        "SCHEDULER_PROXY_SSL_HEADER": value,
    }
    full.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=full, capture_output=True, text=True
    )
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SCHEDULER_PROXY_SSL_HEADER must be a header"
        f" name such as X-Forwarded-Proto, not {value!r}"
    )


# --- request bodies are capped before they are read ----------------------------------

LIMIT = 1024 * 1024  # the documented default, SCHEDULER_MAX_BODY_BYTES


def _read_response(sock: socket.socket) -> bytes:
    """What the server sent until it closed the connection."""
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _send_until_refused(sock: socket.socket, chunk: bytes, most: int) -> int:
    """Send chunk after chunk until the server stops taking them; the bytes it took."""
    sent = 0
    sock.settimeout(2)
    try:
        while sent < most:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def _head(master, path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{master.port}"]
    lines += [f"Authorization: Bearer {master.token}", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Each refused three ways: a Django API view, a Channels HTTP consumer (the
# trigger endpoints), a dashboard page.
PATHS = ["/api/tasks", "/api/runs", "/login/"]


@pytest.mark.e2e
def test_a_declared_oversized_body_is_refused_before_it_is_sent(master):
    for path in PATHS:
        with socket.create_connection(("127.0.0.1", master.port)) as sock:
            # Ten times the limit declared, not a byte of it sent: the answer comes anyway.
            sock.sendall(_head(master, path, Content_Length=str(10 * LIMIT)))
            answer = _read_response(sock)

        assert answer.startswith(b"HTTP/1.1 413 "), (path, answer[:200])
        if path.startswith("/api/"):
            assert answer.endswith(b'{"error": "request body over 1048576 bytes"}'), answer
        else:
            assert answer.endswith(b"request body over 1048576 bytes\n"), answer
    assert master.api("GET", "tasks").json()["results"] == []


@pytest.mark.e2e
def test_a_chunked_body_is_cut_off_once_past_the_limit(master):
    for path in PATHS:
        with socket.create_connection(("127.0.0.1", master.port)) as sock:
            sock.sendall(_head(master, path, Transfer_Encoding="chunked"))
            chunk = b"10000\r\n" + b"[" * 0x10000 + b"\r\n"
            # Up to 64 MiB offered; the server stops reading a little past 1 MiB
            # (what the kernel's buffers hold on top).
            sent = _send_until_refused(sock, chunk, 64 * LIMIT)
            answer = _read_response(sock)

        assert answer.startswith(b"HTTP/1.1 413 "), (path, answer[:200])
        assert sent < 32 * LIMIT, f"{path}: the server read {sent} bytes"
    assert master.api("GET", "tasks").json()["results"] == []


@pytest.mark.e2e
def test_a_body_within_the_limit_is_served(master):
    task = {"name": "padded", "command": "echo " + "x" * 1000}
    response = master.api("POST", "tasks", json=task)
    assert response.status_code == 201, response.text


async def test_the_asgi_app_refuses_a_streamed_body_past_the_limit():
    """Under any ASGI server that streams bodies (the app's own check, not daphne's)."""
    from channels.testing import HttpCommunicator

    from scheduler_site.bodylimit import BodyLimit

    reads = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            reads.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    comm = HttpCommunicator(BodyLimit(app, 100), "POST", "/api/tasks", body=b"x" * 101)
    response = await comm.get_response()

    assert response["status"] == 413
    assert response["body"] == b'{"error": "request body over 100 bytes"}'
    assert reads == ["http.disconnect"]


# --- deeply nested JSON ----------------------------------------------------------------

DEEP = b"[" * 100_000


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/tasks", "/api/runs", "/api/workers/register"])
def test_deeply_nested_json_is_a_400_through_django(api, path):
    response = api.post(path, DEEP, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"] in (
        "request body is nested too deeply",
        "request body is not valid JSON",
    )


@pytest.mark.django_db(transaction=True)
async def test_deeply_nested_json_gets_an_error_frame_and_the_socket_lives_on(
    worker, worker_credential
):
    from channels.testing import WebsocketCommunicator

    from scheduler_site.asgi import application

    headers = [(b"authorization", f"Bearer {worker_credential}".encode())]
    comm = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    assert (await comm.connect(timeout=5))[0]

    await comm.send_to(text_data=DEEP.decode())
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error",
        "code": "malformed",
        "message": "frame is nested too deeply",
    }
    await comm.send_json_to({"type": "hello", "protocol": 1, "capacity": 2, "running": []})
    assert (await comm.receive_json_from(timeout=5))["type"] == "welcome"
    await comm.disconnect()
