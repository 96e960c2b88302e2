"""The published contract (/api/openapi.json) against the API itself: every
route is in it, what it declares is what the API checks, every answer fits
its schemas, and so does every JSON example of the README's API section."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
from django.test import Client
from django.urls import URLPattern
from django.utils import timezone
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from scheduler_site import api_urls, asgi
from scheduler_site.openapi import api_routes
from tasks_app import lifecycle
from tasks_app.models import Run, Task

pytestmark = pytest.mark.django_db

README = Path(__file__).resolve().parent.parent / "README.md"
DOC_URI = "urn:scheduler-api"


@pytest.fixture(scope="module")
def doc() -> dict:
    return Client().get("/api/openapi.json").json()


def strict(schema):
    """A copy in which an object has only the properties it documents: an answer
    with a field the document does not name fails."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def check(doc: dict, schema: dict, instance) -> None:
    """Validate against a schema of the document, with its $refs resolved in it."""
    doc = strict(doc)
    doc["components"]["schemas"]["_checked"] = strict(schema)
    registry = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/_checked"}, registry=registry
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


def operation(doc: dict, method: str, url: str) -> dict:
    """The document's operation for a concrete URL (/api/tasks/1?x=y)."""
    path = url.split("?", 1)[0]
    for template, item in doc["paths"].items():
        matches = re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path)
        if matches and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {url} is not in the document")


def answer_schema(doc: dict, method: str, url: str, status: int) -> dict:
    responses = operation(doc, method, url)["responses"]
    assert str(status) in responses, f"{method} {url} does not document {status}"
    return responses[str(status)]["content"]["application/json"]["schema"]


def check_answer(doc, method: str, url: str, response) -> dict:
    data = response.json()
    check(doc, answer_schema(doc, method, url, response.status_code), data)
    return data


# --- the document ----------------------------------------------------------------


def test_it_publishes_a_valid_openapi_3_1_document(doc):
    validate_openapi(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_route_and_method_of_the_api_is_in_the_document(doc):
    declared = [p for p in api_urls.urlpatterns if hasattr(p.callback, "api_operations")]
    # Only the catch-all 404 has no operations.
    assert [p.name for p in api_urls.urlpatterns if p not in declared] == ["no-such-endpoint"]
    for path, pattern in api_routes():
        assert path in doc["paths"], path
        assert set(doc["paths"][path]) == {m.lower() for m in pattern.callback.api_operations}
    assert len(doc["paths"]) == len(declared)


def test_the_asgi_trigger_routes_are_in_the_document(doc):
    routes = [
        route.pattern
        for route in asgi.http_routes.routes
        if isinstance(route, URLPattern) and str(route.pattern).startswith("api/")
    ]
    assert [str(r) for r in routes] == ["api/tasks/<int:pk>/run", "api/runs"]
    for route in routes:
        path = "/" + re.sub(r"<\w+:(\w+)>", r"{\1}", str(route))
        assert "post" in doc["paths"][path]


def test_the_document_publishes_the_schemas_the_api_checks_requests_with(doc):
    checked = 0
    for path, pattern in api_routes():
        for method, op in pattern.callback.api_operations.items():
            if op.body is None:
                continue
            published = doc["components"]["schemas"][op.body.name]
            assert published == op.body.schema
            ref = doc["paths"][path][method.lower()]["requestBody"]
            assert ref["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{op.body.name}"
            }
            checked += 1
    # tasks: create, put, patch; run one, many; register a worker; approve one;
    # cancel many, retry many
    assert checked == 9


def test_every_operation_documents_its_errors_with_the_error_schema(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            public = op.get("security") == []
            statuses = set(op["responses"])
            assert "500" in statuses, (method, path)
            if not public:
                assert {"401", "403"} <= statuses, (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }


# --- the document against real answers -------------------------------------------


def test_answers_about_tasks_fit_the_document(doc, api):
    created = api.post(
        "/api/tasks",
        json.dumps({"name": "t", "command": "echo hi", "timeout": 5, "labels": ["linux"]}),
        content_type="application/json",
    )
    task = check_answer(doc, "POST", "/api/tasks", created)
    check_answer(doc, "GET", "/api/tasks", api.get("/api/tasks"))
    check_answer(doc, "GET", "/api/tasks/1", api.get(f"/api/tasks/{task['id']}"))
    patched = api.patch(
        f"/api/tasks/{task['id']}", json.dumps(task), content_type="application/json"
    )
    check_answer(doc, "PATCH", "/api/tasks/1", patched)
    bad = api.post("/api/tasks", json.dumps({"nme": "x"}), content_type="application/json")
    assert check_answer(doc, "POST", "/api/tasks", bad)["error"] == "invalid fields"
    missing = api.get("/api/tasks/999")
    check_answer(doc, "GET", "/api/tasks/999", missing)


def test_answers_about_runs_fit_the_document_including_a_deleted_tasks_and_a_cancel(
    doc, api, task, worker
):
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    # A superseded attempt with a late result: the richest shape an attempt has.
    type(attempt).objects.filter(pk=attempt.pk).update(
        worker_name=worker.name,
        late_status="succeeded",
        late_exit_code=0,
        late_reason="",
        late_reported_at=timezone.now(),
    )
    cancelled = api.post(f"/api/runs/{run.pk}/cancel")
    body = check_answer(doc, "POST", "/api/runs/1/cancel", cancelled)
    assert body["cancel_requested_by"] == "bob"

    triggered = api.post(
        f"/api/tasks/{task.pk}/run",
        json.dumps({"env": {"A": "1"}, "args": ["x"]}),
        content_type="application/json",
    )
    check_answer(doc, "POST", "/api/tasks/1/run", triggered)
    bulk = api.post(
        "/api/runs", json.dumps({"task": task.pk, "count": 2}), content_type="application/json"
    )
    check_answer(doc, "POST", "/api/runs", bulk)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.FAILED)
    check_answer(doc, "POST", "/api/runs/1/retry", api.post(f"/api/runs/{run.pk}/retry"))

    Task.objects.get(pk=task.pk).delete()
    page = check_answer(doc, "GET", "/api/runs", api.get(f"/api/runs?task={task.pk}&limit=2"))
    assert {r["task_deleted"] for r in page["results"]} == {True}
    assert page["next"] is not None
    detail = check_answer(doc, "GET", "/api/runs/1", api.get(f"/api/runs/{run.pk}"))
    assert detail["task_deleted"] is True
    assert detail["attempts"][0]["late_result"]["status"] == "succeeded"
    check_answer(doc, "POST", "/api/runs/1/cancel", api.post(f"/api/runs/{run.pk}/cancel"))


def test_answers_about_workers_and_the_scheduler_fit_the_document(doc, api, worker):
    from workers_app.models import EnrollmentToken

    check_answer(doc, "GET", "/api/workers", api.get("/api/workers"))
    drained = api.post(f"/api/workers/{worker.pk}/drain")
    check_answer(doc, "POST", "/api/workers/1/drain", drained)
    raw, _ = EnrollmentToken.mint(note="tests")
    enrolled = Client().post(
        "/api/workers/register",
        json.dumps({"token": raw, "name": "node-9", "capacity": 2}),
        content_type="application/json",
    )
    check_answer(doc, "POST", "/api/workers/register", enrolled)
    check_answer(doc, "GET", "/api/scheduler", api.get("/api/scheduler"))
    check_answer(doc, "POST", "/api/scheduler/pause", api.post("/api/scheduler/pause"))


# --- the README's examples --------------------------------------------------------


def readme_api_section() -> str:
    text = README.read_text()
    start = text.index("## JSON API\n")
    return text[start : text.index("\n## ", start + 1)]


def curl_bodies() -> list[tuple[str, str, dict]]:
    """(method, URL, body) of every curl with -d in the README's API section."""
    found = []
    for command in re.split(r"\n(?=curl )", readme_api_section()):
        command = command.replace("\\\n", " ")
        match = re.search(r"-d '([^']*)'", command)
        if not command.startswith("curl ") or not match:
            continue
        method = re.search(r"-X (\w+)", command).group(1)
        url = re.search(r"localhost:8000(/api/\S*)", command).group(1)
        found.append((method, url, json.loads(match.group(1))))
    return found


def example_answers() -> list[tuple[str, str, int, object]]:
    """(method, URL, status, JSON) of every example answer in the README's API section."""
    pattern = (
        r"`(GET|POST|PUT|PATCH|DELETE) (/api/\S*)`[^\n]* answers `(\d{3})`:\s*```json\n(.*?)```"
    )
    return [
        (method, url, int(status), json.loads(body))
        for method, url, status, body in re.findall(pattern, readme_api_section(), re.S)
    ]


def test_the_readme_shows_examples_of_both_kinds():
    assert len(curl_bodies()) >= 5
    assert {status for _, _, status, _ in example_answers()} >= {200, 201, 400}


@pytest.mark.parametrize(
    ("method", "url", "body"), curl_bodies(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_request_body_in_the_readme_fits_the_document(doc, method, url, body):
    op = operation(doc, method, url)
    check(doc, op["requestBody"]["content"]["application/json"]["schema"], body)


@pytest.mark.parametrize(
    ("method", "url", "status", "answer"),
    example_answers(),
    ids=lambda v: str(v) if isinstance(v, str | int) else "",
)
def test_every_example_answer_in_the_readme_fits_the_document(doc, method, url, status, answer):
    check(doc, answer_schema(doc, method, url, status), answer)


def test_the_readme_links_the_docs_and_names_every_endpoint(doc):
    section = readme_api_section()
    assert "/api/docs" in section and "/api/openapi.json" in section
    for path, item in doc["paths"].items():
        readme_path = re.sub(r"\{pk\}", "<id>", path).replace("{action}", "<")
        for method in item:
            assert re.search(rf"{method.upper()}[^|]*{re.escape(readme_path)}", section), (
                f"{method.upper()} {path} is not in the README's endpoint table"
            )


def test_the_check_refuses_a_field_the_document_does_not_name(doc, api, task):
    """The checks above would let nothing through unnoticed: an extra field fails."""
    answer = api.get(f"/api/tasks/{task.pk}").json()
    schema = answer_schema(doc, "GET", "/api/tasks/1", 200)
    check(doc, schema, answer)

    with pytest.raises(AssertionError, match="'colour' was unexpected"):
        check(doc, schema, {**answer, "colour": "red"})
    with pytest.raises(AssertionError, match="'name' is a required property"):
        check(doc, schema, {k: v for k, v in answer.items() if k != "name"})
