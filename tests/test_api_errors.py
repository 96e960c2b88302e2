"""Every answer under /api/ is JSON: unknown paths, trailing slashes, wrong
methods and unexpected exceptions, through Django's views and through the ASGI
application (where the trigger endpoints are Channels consumers)."""

from __future__ import annotations

import json
import logging

import pytest
from channels.testing import HttpCommunicator
from django.test import Client

from scheduler_site.asgi import application
from tasks_app import lifecycle
from tasks_app.models import Run
from tests.engines import in_own_loop

pytestmark = pytest.mark.django_db

DOCS_HINT = "the endpoints are listed at /api/docs"


def asgi(method: str, path: str, body: bytes = b"", token: str | None = None):
    """A request through the ASGI app that daphne serves: status, headers, raw body."""
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))

    async def send():
        communicator = HttpCommunicator(application, method, path, body=body, headers=headers)
        return await communicator.get_response(timeout=10)

    response = in_own_loop(send)
    return response["status"], dict(response["headers"]), response["body"]


# --- 404 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("get", "/api/tasks/abc", f"no such endpoint: /api/tasks/abc; {DOCS_HINT}"),
        ("get", "/api/nothing/here", f"no such endpoint: /api/nothing/here; {DOCS_HINT}"),
        ("get", "/api/", f"no such endpoint: /api/; {DOCS_HINT}"),
        ("get", "/api/tasks/", "no such endpoint; did you mean /api/tasks?"),
        ("post", "/api/tasks/", "no such endpoint; did you mean /api/tasks?"),
        ("get", "/api/tasks/7/", "no such endpoint; did you mean /api/tasks/7?"),
        ("post", "/api/runs/3/cancel/", "no such endpoint; did you mean /api/runs/3/cancel?"),
        ("get", "/api/workers/", "no such endpoint; did you mean /api/workers?"),
    ],
)
def test_it_answers_a_json_404_for_any_unknown_api_path(api, method, path, message):
    response = getattr(api, method)(path)

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": message}


def test_it_never_redirects_an_api_url_to_add_a_slash(api, settings):
    settings.APPEND_SLASH = True

    response = api.get("/api/tasks/abc")

    assert response.status_code == 404
    assert "Location" not in response
    assert response.json()["error"].startswith("no such endpoint")


def test_it_answers_an_unknown_path_with_json_even_to_a_session_without_csrf(bob):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(bob)

    response = browser.post("/api/tasks/", "{}", content_type="application/json")

    assert response.status_code == 404
    assert response.json() == {"error": "no such endpoint; did you mean /api/tasks?"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("POST", "/api/tasks/abc/run", f"no such endpoint: /api/tasks/abc/run; {DOCS_HINT}"),
        ("POST", "/api/tasks/1/run/", "no such endpoint; did you mean /api/tasks/1/run?"),
        ("POST", "/api/runs/", "no such endpoint; did you mean /api/runs?"),
        ("GET", "/api/tasks/", "no such endpoint; did you mean /api/tasks?"),
    ],
)
def test_the_asgi_app_answers_a_json_404_too(bob_token, method, path, message):
    status, headers, body = asgi(method, path, token=bob_token)

    assert status == 404
    assert headers[b"Content-Type"] == b"application/json"
    assert json.loads(body) == {"error": message}


def test_it_answers_a_refused_host_header_with_json(api):
    response = api.get("/api/tasks", headers={"Host": "evil.example"})

    assert response.status_code == 400
    assert response.json() == {"error": "this server does not answer to that Host header"}


def test_pages_outside_the_api_keep_djangos_own_400(client):
    response = client.get("/tasks/", headers={"Host": "evil.example"})

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


# --- 405 -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/tasks/1/run", "POST"),
        ("DELETE", "/api/runs", "GET, POST"),
        ("POST", "/api/openapi.json", "GET"),
        ("POST", "/api/docs", "GET"),
    ],
)
def test_the_asgi_app_answers_a_json_405_with_allow(bob_token, method, path, allow):
    status, headers, body = asgi(method, path, token=bob_token)

    assert status == 405
    assert headers[b"Allow"] == allow.encode()
    assert json.loads(body) == {"error": f"method {method} not allowed; use {allow}"}


# --- 500 -------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise RuntimeError("the database caught fire")


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_it_answers_a_json_500_when_an_api_view_raises(
    bob_token, task, monkeypatch, settings, caplog, debug
):
    settings.DEBUG = debug
    run = lifecycle.trigger_run(task)
    monkeypatch.setattr(lifecycle, "cancel_run", _fail)
    client = Client(headers={"Authorization": f"Bearer {bob_token}"}, raise_request_exception=False)

    with caplog.at_level(logging.ERROR, logger="django.request"):
        response = client.post(f"/api/runs/{run.pk}/cancel")

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": "internal server error; it has been logged"}
    [record] = [r for r in caplog.records if r.name == "django.request"]
    assert record.getMessage() == f"Internal Server Error: /api/runs/{run.pk}/cancel"
    assert record.exc_info[0] is RuntimeError
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED


def test_a_500_is_reported_like_djangos_own(bob_token, task, monkeypatch):
    """Error trackers hook got_request_exception: the test client re-raises what it
    is told about, as it does for an exception Django handles itself."""
    run = lifecycle.trigger_run(task)
    monkeypatch.setattr(lifecycle, "retry_run", _fail)
    client = Client(headers={"Authorization": f"Bearer {bob_token}"})

    with pytest.raises(RuntimeError, match="caught fire"):
        client.post(f"/api/runs/{run.pk}/retry")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/tasks/{pk}/run", "/api/runs"])
def test_the_trigger_consumers_answer_a_json_500_when_the_domain_raises(
    bob_token, task, monkeypatch, caplog, path
):
    monkeypatch.setattr(lifecycle, "trigger_runs", _fail)
    body = json.dumps({"task": task.pk, "count": 2}).encode() if path == "/api/runs" else b""

    with caplog.at_level(logging.ERROR, logger="django.request"):
        status, headers, answer = asgi("POST", path.format(pk=task.pk), body, token=bob_token)

    assert status == 500
    assert headers[b"Content-Type"] == b"application/json"
    assert json.loads(answer) == {"error": "internal server error; it has been logged"}
    assert any(
        r.name == "django.request" and r.exc_info and r.exc_info[0] is RuntimeError
        for r in caplog.records
    )
    assert Run.objects.count() == 0
