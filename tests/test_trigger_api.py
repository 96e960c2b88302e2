"""Starting runs over the API: one, many at once, with run parameters.

Under ASGI a POST to these two paths is served by a Channels HTTP consumer
(tasks_app.trigger_api); the Django views answer the same requests with the
same parsing and the same writer job. Most tests use Django's test client;
`asgi()` sends the same requests through the real ASGI application, which is
what a server runs.
"""

from __future__ import annotations

import json
import shlex

import pytest
from channels.testing import HttpCommunicator
from django.test import Client

from scheduler_site.asgi import application
from tasks_app.models import Attempt, Run, Task
from tasks_app.schemas import MAX_RUNS_PER_REQUEST
from tests.engines import in_own_loop

pytestmark = pytest.mark.django_db


def post(client: Client, url: str, payload) -> tuple[int, dict]:
    response = client.post(url, json.dumps(payload), content_type="application/json")
    return response.status_code, response.json()


def asgi(
    method: str,
    path: str,
    payload=None,
    token: str | None = None,
    extra_headers=(),
    host: bytes = b"127.0.0.1",
):
    """A request through the ASGI app (what daphne serves): status, JSON body, headers.
    A payload that is a str is sent as it is."""
    headers = [(b"host", host), *extra_headers]
    if not any(name == b"content-type" for name, _ in extra_headers):
        headers.append((b"content-type", b"application/json"))
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if isinstance(payload, str):
        body = payload.encode()
    else:
        body = b"" if payload is None else json.dumps(payload).encode()

    async def send():
        communicator = HttpCommunicator(application, method, path, body=body, headers=headers)
        return await communicator.get_response(timeout=10)

    response = in_own_loop(send)
    return response["status"], json.loads(response["body"]), dict(response["headers"])


def test_it_starts_many_runs_of_a_task_in_one_request(api, bob, task):
    status, body = post(api, "/api/runs", {"task": task.pk, "count": 3})

    assert status == 201
    runs = list(Run.objects.order_by("id"))
    assert [r["id"] for r in body["results"]] == [r.pk for r in runs]
    assert {(r.task_id, r.trigger, r.created_by, r.status) for r in runs} == {
        (task.pk, Run.Trigger.API, bob, Run.Status.QUEUED)
    }
    assert Attempt.objects.filter(run__in=runs, try_number=1, status="queued").count() == 3
    first = body["results"][0]
    assert (first["status"], first["params"], first["command"]) == ("queued", {}, task.command)
    assert [a["status"] for a in first["attempts"]] == ["queued"]


def test_it_starts_one_run_per_set_of_parameters(api, task):
    payload = {
        "task": task.pk,
        "runs": [
            {"env": {"REGION": "eu"}, "args": ["--since", "two words"]},
            {"args": ["--all"]},
            {},
        ],
    }

    status, body = post(api, "/api/runs", payload)

    assert status == 201
    runs = list(Run.objects.order_by("id"))
    assert [r.params for r in runs] == [
        {"env": {"REGION": "eu"}, "args": ["--since", "two words"]},
        {"args": ["--all"]},
        {},
    ]
    assert [r.definition["argv"] for r in runs] == [
        ["python3", "-c", "print(6*7)", "--since", "two words"],
        ["python3", "-c", "print(6*7)", "--all"],
        ["python3", "-c", "print(6*7)"],
    ]
    assert [r.definition["env"] for r in runs] == [{"REGION": "eu"}, {}, {}]
    assert [r["params"] for r in body["results"]] == [r.params for r in runs]


def test_run_parameters_stay_words_in_a_shell_command(api):
    task = Task.objects.create(
        name="greet", command="echo hello", shell=True, env={"A": "task", "B": "task"}
    )

    status, body = post(
        api, f"/api/tasks/{task.pk}/run", {"env": {"B": "run"}, "args": ["$(reboot)", "a b"]}
    )

    assert status == 201
    run = Run.objects.get()
    assert run.definition["command"] == "echo hello " + shlex.join(["$(reboot)", "a b"])
    assert run.definition["argv"] is None
    assert run.definition["env"] == {"A": "task", "B": "run"}
    assert body["command"] == run.definition["command"]
    # The task itself is untouched.
    task.refresh_from_db()
    assert (task.command, task.env) == ("echo hello", {"A": "task", "B": "task"})


@pytest.mark.parametrize(
    ("payload", "error", "errors"),
    [
        ({"count": 2}, "invalid fields", {"task": ["This field is required."]}),
        ({"task": "1"}, "invalid fields", {"task": ["Expected an integer."]}),
        ({"task": 1.0}, "invalid fields", {"task": ["Expected an integer."]}),
        ({"task": 1, "count": 0}, "invalid fields", {"count": ["Give 1 to 1000."]}),
        (
            {"task": 1, "count": MAX_RUNS_PER_REQUEST + 1},
            "invalid fields",
            {"count": ["Give 1 to 1000."]},
        ),
        ({"task": 1, "count": True}, "invalid fields", {"count": ["Expected an integer."]}),
        ({"task": 1, "runs": []}, "invalid fields", {"runs": ["Give 1 to 1000 runs."]}),
        (
            {"task": 1, "count": 1, "runs": [{}]},
            "invalid fields",
            {"body": ["Give either count or runs, not both."]},
        ),
        ({"task": 1, "colour": "red"}, "invalid fields", {"colour": ["Unknown field."]}),
        (
            {"task": 1, "runs": [{}, {"env": {"1BAD": "x"}}]},
            "invalid fields",
            {
                "runs[1].env": [
                    "Invalid variable name '1BAD': use letters, digits and '_', "
                    "not starting with a digit."
                ]
            },
        ),
        (
            {"task": 1, "runs": [{"args": ["ok", 3]}]},
            "invalid fields",
            {"runs[0].args[1]": ["Expected a string."]},
        ),
        (
            {"task": 1, "runs": [{"args": ["a\x00b"]}]},
            "invalid run parameters",
            {"runs[0].args": ["An argument contains a NUL byte or is over 4096 chars."]},
        ),
        (
            {"task": 1, "runs": [{"cwd": "/"}]},
            "invalid fields",
            {"runs[0].cwd": ["Unknown field."]},
        ),
        (
            {"task": 1, "runs": ["--all"]},
            "invalid fields",
            {"runs[0]": ["Run parameters must be an object with env and/or args."]},
        ),
    ],
)
def test_it_refuses_a_bad_bulk_request_and_starts_nothing(api, task, payload, error, errors):
    status, body = post(api, "/api/runs", payload)

    assert (status, body) == (400, {"error": error, "errors": errors})
    assert Run.objects.count() == 0


def test_it_refuses_bad_parameters_of_a_single_run(api, task):
    status, body = post(api, f"/api/tasks/{task.pk}/run", {"args": "--all"})

    assert (status, body) == (
        400,
        {"error": "invalid fields", "errors": {"args": ["Expected a list of strings."]}},
    )
    assert Run.objects.count() == 0


def test_it_answers_404_and_409_for_a_missing_or_disabled_task(api, task):
    assert post(api, "/api/runs", {"task": task.pk + 1, "count": 2}) == (
        404,
        {"error": f"no task with id {task.pk + 1}"},
    )
    assert post(api, "/api/runs", {"task": 2**70, "count": 2}) == (
        404,
        {"error": f"no task with id {2**70}"},
    )
    Task.objects.filter(pk=task.pk).update(enabled=False)
    assert post(api, "/api/runs", {"task": task.pk, "count": 2}) == (
        409,
        {"error": "task 'answer' is disabled"},
    )
    assert Run.objects.count() == 0


def test_it_refuses_a_bulk_request_without_a_valid_token(client, task):
    response = client.post(
        "/api/runs",
        json.dumps({"task": task.pk}),
        content_type="application/json",
        headers={"Authorization": "Bearer api_not-a-token"},
    )

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json() == {"error": "invalid, expired or revoked API token"}
    assert Run.objects.count() == 0


# --- through the ASGI application ------------------------------------------------
# The writer and Django's views run in threads of their own there, with their own
# connections: these tests commit instead of running in one test transaction.


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_serves_a_trigger_like_the_view_does(bob, bob_token, task):
    status, body, headers = asgi("POST", f"/api/tasks/{task.pk}/run", token=bob_token)

    assert status == 201
    assert headers[b"Content-Type"] == b"application/json"
    run = Run.objects.get()
    assert (body["id"], body["task"], body["trigger"], body["status"]) == (
        run.pk,
        task.pk,
        "api",
        "queued",
    )
    assert run.created_by == bob
    assert [a["id"] for a in body["attempts"]] == [run.attempts.get().pk]


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_serves_a_bulk_trigger_and_still_lists_runs_with_get(bob_token, task):
    status, body, _ = asgi("POST", "/api/runs", {"task": task.pk, "count": 2}, token=bob_token)
    assert status == 201 and len(body["results"]) == 2

    status, listed, _ = asgi("GET", "/api/runs", token=bob_token)

    assert status == 200
    assert [r["id"] for r in listed["results"]] == sorted(
        (r["id"] for r in body["results"]), reverse=True
    )


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_checks_the_host_header_as_django_does(bob_token, task):
    status, body, _ = asgi(
        "POST", f"/api/tasks/{task.pk}/run", token=bob_token, host=b"evil.example"
    )

    assert (status, body) == (400, {"error": "this server does not answer to that Host header"})
    assert Run.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_refuses_the_same_way(bob_token, task):
    status, body, headers = asgi("POST", "/api/runs", {"task": task.pk, "count": 0})
    assert (status, body) == (
        401,
        {"error": "authentication required: send Authorization: Bearer <token> or log in"},
    )
    assert headers[b"WWW-Authenticate"] == b'Bearer realm="api"'

    status, body, _ = asgi("POST", "/api/runs", {"task": task.pk, "count": 0}, token=bob_token)
    assert (status, body) == (
        400,
        {"error": "invalid fields", "errors": {"count": ["Give 1 to 1000."]}},
    )

    status, body, _ = asgi("PUT", f"/api/tasks/{task.pk}/run", token=bob_token)
    assert (status, body) == (405, {"error": "method PUT not allowed; use POST"})
    assert Run.objects.count() == 0


def test_it_refuses_a_run_too_large_to_send_to_an_agent_and_starts_nothing(api, task):
    big = {"env": {"BLOB": "x" * 600_000}}

    single = post(api, f"/api/tasks/{task.pk}/run", big)
    bulk = post(api, "/api/runs", {"task": task.pk, "runs": [{}, big]})

    message = (
        "The command, its arguments and environment come to 600,139 bytes; "
        "at most 524,288 (they go to the agent in one message)."
    )
    assert single == bulk == (400, {"error": message})
    assert Run.objects.count() == 0


def test_it_refuses_to_save_a_task_too_large_to_send_to_an_agent(api):
    response = post(
        api, "/api/tasks", {"name": "big", "command": "true", "env": {"A": "x" * 600_000}}
    )

    assert response[0] == 400
    assert response[1]["errors"] == {
        "command": [
            "The command, its arguments and environment come to 600,092 bytes; "
            "at most 524,288 (they go to the agent in one message)."
        ]
    }
    assert not Task.objects.filter(name="big").exists()


@pytest.mark.parametrize(
    ("params", "errors"),
    [
        ({"env": 0}, {"env": ["Expected an object of NAME: value strings."]}),
        ({"env": []}, {"env": ["Expected an object of NAME: value strings."]}),
        ({"args": ""}, {"args": ["Expected a list of strings."]}),
        ({"args": {}}, {"args": ["Expected a list of strings."]}),
    ],
)
def test_it_refuses_run_parameters_of_the_wrong_type_even_when_empty(api, task, params, errors):
    assert post(api, f"/api/tasks/{task.pk}/run", params) == (
        400,
        {"error": "invalid fields", "errors": errors},
    )
    assert Run.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_refuses_bodies_it_cannot_read_and_starts_nothing(bob_token, task):
    nested = "[" * 50_000 + "]" * 50_000
    assert asgi("POST", "/api/runs", nested, token=bob_token)[:2] == (
        400,
        {"error": "request body is nested too deeply", "errors": {}},
    )
    multipart = [(b"content-type", b"multipart/form-data; boundary=")]
    assert asgi(
        "POST", f"/api/tasks/{task.pk}/run", "--x\r\n", token=bob_token, extra_headers=multipart
    )[:2] == (400, {"error": "send the request body as JSON", "errors": {}})
    too_big = {"task": task.pk, "runs": [{"args": ["x" * 4000] * 100}] * 5}
    # Refused by the server's body limit before the endpoint reads it (413).
    assert asgi("POST", "/api/runs", too_big, token=bob_token)[:2] == (
        413,
        {"error": "request body over 1048576 bytes"},
    )
    assert Run.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_asgi_app_takes_a_session_with_its_csrf_token_and_refuses_one_without(bob, task):
    browser = Client()
    browser.force_login(bob)
    browser.get("/tasks/")  # sets the CSRF cookie
    session = browser.cookies["sessionid"].value
    csrf = browser.cookies["csrftoken"].value
    cookie = f"sessionid={session}; csrftoken={csrf}".encode()
    url = f"/api/tasks/{task.pk}/run"

    refused = asgi("POST", url, extra_headers=[(b"cookie", cookie)])
    assert refused[:2] == (
        403,
        {"error": "CSRF check failed; send the X-CSRFToken header with a session"},
    )
    taken = asgi("POST", url, extra_headers=[(b"cookie", cookie), (b"x-csrftoken", csrf.encode())])
    assert taken[0] == 201
    run = Run.objects.get()
    assert (taken[1]["id"], run.created_by) == (run.pk, bob)
