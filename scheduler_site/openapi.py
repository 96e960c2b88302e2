"""The API's published contract: an OpenAPI 3.1 document, and a page of it for people.

Built from the route table (scheduler_site.api_urls) and the operations each
view declares in its `api_view`, whose request schemas are the ones that view
checks requests with. Nothing here is written beside the API by hand.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata

from django.http import JsonResponse
from django.shortcuts import render
from django.urls import URLPattern
from django.urls.converters import IntConverter

from tasks_app import schemas
from tasks_app.apispec import Operation
from tasks_app.jsonapi import api_view
from workers_app import schemas as worker_schemas

PREFIX = "/api/"

# Answers' schemas by name; where one appears inside another it becomes a $ref.
NAMED = {
    "Task": schemas.TASK,
    "Run": schemas.RUN,
    "RunWithOutput": schemas.RUN_WITH_OUTPUT,
    "Attempt": schemas.ATTEMPT,
    "AttemptWithOutput": schemas.ATTEMPT_WITH_OUTPUT,
    "Scheduler": schemas.SCHEDULER,
    "Worker": worker_schemas.WORKER,
    "Enrollment": worker_schemas.ENROLLED,
    "Error": schemas.ERROR,
}

ERRORS = {
    400: "Bad input (a body or query that does not fit); nothing changed.",
    401: "No credentials, or bad ones (with `WWW-Authenticate: Bearer`).",
    403: "Refused: a session without its CSRF token, or (enrollment) a bad token.",
    404: "No such object.",
    409: "Not possible in its current state.",
    500: "An unexpected error of the server; it is logged.",
}

SUCCESS = {200: "OK", 201: "Created", 204: "Done; no body"}

DESCRIPTION = """\
Tasks, runs and workers of the scheduler, as JSON.

Authenticate with `Authorization: Bearer <token>` (mint one with
`make token USER=USERNAME`, or `.venv/bin/python manage.py apitoken USERNAME`),
or with a logged-in browser session
and its CSRF token for writes.

Every answer under /api/ is JSON, errors too: `{"error": "...", "errors":
{field: [messages]}}`, `errors` only for bad input, keyed by the path of the
value (`timeout`, `labels[1]`, `runs[0].env`). A wrong method gets 405 with
`Allow`; an unknown path 404 (with a trailing slash, it names the path
without one); an unexpected failure 500.

Lists are pages: `{"results": [...], "next": URL or null}`, `next` an
absolute URL to fetch as it is.
"""


def _version() -> str:
    try:
        return metadata.version("django-task-scheduler")
    except metadata.PackageNotFoundError:
        return "0"


def api_routes() -> list[tuple[str, URLPattern]]:
    """(OpenAPI path, URL pattern) of every declared API view, in route order."""
    from scheduler_site import api_urls  # the urls import the views, which import this

    routes = []
    for pattern in api_urls.urlpatterns:
        if getattr(pattern.callback, "api_operations", None) is None:
            continue
        path = str(pattern.pattern)
        for name in pattern.pattern.converters:
            path = path.replace(f"<{_converter_text(pattern, name)}:{name}>", f"{{{name}}}")
        routes.append((PREFIX + path, pattern))
    return routes


def _converter_text(pattern: URLPattern, name: str) -> str:
    route = str(pattern.pattern)
    start = route.index(f":{name}>")
    return route[route.rindex("<", 0, start) + 1 : start]


def _path_parameters(pattern: URLPattern, operation: Operation) -> list[dict]:
    parameters = []
    for name, converter in pattern.pattern.converters.items():
        if isinstance(converter, IntConverter):
            schema = {"type": "integer", "minimum": 1}
        else:
            schema = {"type": "string"}
        schema.update(operation.path_params.get(name, {}))
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return parameters


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _with_refs(schema, top: dict | None = None):
    """A copy of an answer's schema with the named schemas inside it as $refs."""
    for name, named in NAMED.items():
        if schema is named and schema is not top:
            return _ref(name)
    if isinstance(schema, dict):
        return {key: _with_refs(value, top) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_with_refs(value, top) for value in schema]
    return schema


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _operation(pattern: URLPattern, method: str, operation: Operation) -> dict:
    data: dict = {
        "operationId": f"{pattern.name}-{method.lower()}",
        "summary": operation.summary,
    }
    if operation.description:
        data["description"] = operation.description
    parameters = _path_parameters(pattern, operation) + list(operation.query)
    if parameters:
        data["parameters"] = parameters
    if operation.body is not None:
        data["requestBody"] = {
            "description": operation.body.description,
            "required": not operation.body_optional,
            "content": _json(_ref(operation.body.name)),
        }
    responses = {}
    for status, schema in operation.responses.items():
        response: dict = {"description": SUCCESS[status]}
        if schema is not None and operation.content_type == "application/json":
            response["content"] = _json(_with_refs(schema))
        elif operation.content_type != "application/json":
            response["content"] = {operation.content_type: {"schema": {"type": "string"}}}
        responses[str(status)] = response
    errors = set(operation.errors) | {500}
    if operation.body is not None or operation.query:
        errors.add(400)
    if not operation.public:
        errors |= {401, 403}
    for status in sorted(errors):
        responses[str(status)] = {"description": ERRORS[status], "content": _json(_ref("Error"))}
    data["responses"] = responses
    if operation.public:
        data["security"] = []
    return data


@cache
def document() -> dict:
    """The OpenAPI 3.1 document of the API (built once per process)."""
    paths: dict = {}
    bodies: dict = {}
    for path, pattern in api_routes():
        item = paths.setdefault(path, {})
        for method, operation in pattern.callback.api_operations.items():
            item[method.lower()] = _operation(pattern, method, operation)
            if operation.body is not None:
                bodies[operation.body.name] = operation.body.schema
    components = {name: _with_refs(schema, top=schema) for name, schema in NAMED.items()}
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "Scheduler API", "version": _version(), "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "schemas": {**dict(sorted(bodies.items())), **components},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token from `make token USER=USERNAME`",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "sessionid",
                    "description": "a logged-in browser session; writes also need the "
                    "X-CSRFToken header",
                },
            },
        },
    }


@api_view(
    {
        "GET": Operation(
            "This document",
            {200: {"type": "object", "description": "an OpenAPI 3.1 document"}},
            public=True,
        )
    }
)
def openapi_json(request):
    return JsonResponse(document(), json_dumps_params={"indent": 1})


@api_view(
    {
        "GET": Operation(
            "This document, as a page for people",
            {200: None},
            public=True,
            content_type="text/html",
        )
    }
)
def docs(request):
    return render(request, "api/docs.html", docs_context())


# --- the page ------------------------------------------------------------------------


@cache
def docs_context() -> dict:
    doc = document()
    endpoints = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            endpoints.append(
                {
                    "anchor": op["operationId"],
                    "method": method.upper(),
                    "path": path,
                    "summary": op["summary"],
                    "description": op.get("description", ""),
                    "public": op.get("security") == [],
                    "parameters": [
                        {
                            "name": p["name"],
                            "where": p["in"],
                            "type": _type_text(p["schema"]),
                            "notes": _notes(p["schema"], p.get("description", "")),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "body": _ref_name(op["requestBody"]["content"]["application/json"]["schema"])
                    if "requestBody" in op
                    else None,
                    "body_optional": "requestBody" in op and not op["requestBody"]["required"],
                    "responses": [
                        {
                            "status": status,
                            "description": response["description"],
                            "type": _type_text(response["content"]["application/json"]["schema"])
                            if "application/json" in response.get("content", {})
                            else "",
                        }
                        for status, response in op["responses"].items()
                    ],
                }
            )
    components = []
    for name, schema in doc["components"]["schemas"].items():
        required = set(schema.get("required", ()))
        components.append(
            {
                "name": name,
                "description": schema.get("description", ""),
                "fields": [
                    {
                        "name": field,
                        "required": field in required,
                        "type": _type_text(sub),
                        "notes": _notes(sub, sub.get("description", "")),
                    }
                    for field, sub in schema.get("properties", {}).items()
                ],
                "json": json.dumps(schema, indent=2, ensure_ascii=False),
            }
        )
    return {"doc": doc, "endpoints": endpoints, "components": components}


def _ref_name(schema: dict) -> str:
    return schema["$ref"].rsplit("/", 1)[1]


def _type_text(schema: dict) -> str:
    if "$ref" in schema:
        return _ref_name(schema)
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "oneOf" in schema:
        return " or ".join(_type_text(s) for s in schema["oneOf"])
    kinds = schema.get("type", "any")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    words = []
    for kind in kinds:
        if kind == "array" and "items" in schema:
            words.append(f"list of {_type_text(schema['items'])}")
        elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            words.append(f"object of {_type_text(schema['additionalProperties'])}")
        else:
            words.append(kind)
    return " or ".join(words)


def _notes(schema: dict, description: str) -> str:
    notes = [description] if description else []
    for keyword, text in (
        ("minimum", "≥ {}"),
        ("maximum", "≤ {}"),
        ("minLength", "at least {} characters"),
        ("maxLength", "at most {} characters"),
        ("minItems", "at least {} items"),
        ("maxItems", "at most {} items"),
        ("default", "default {}"),
    ):
        if keyword in schema:
            value = schema[keyword]
            notes.append(text.format(json.dumps(value) if keyword == "default" else value))
    return "; ".join(notes)
