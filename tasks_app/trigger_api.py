"""The API's trigger endpoints: POST /api/tasks/<id>/run and POST /api/runs.

Starting runs is the API's hot path, so these two are Channels HTTP
consumers rather than Django views: under daphne a Django view pays about
2 ms of server CPU per request for its middleware's thread hops (measured on
the development machine: 430 requests/s for an empty view, 3,100/s for an
empty consumer). Everything a request needs from the database (its token or
session, its task, the new runs) is done by the writer together with
whatever else accumulated, in one transaction. Other methods on these paths
are served by the Django API views (GET /api/runs lists runs).

POST /api/runs starts many runs of one task in one request and one
transaction: {"task": ID, "count": N} or {"task": ID, "runs": [{"env":
{...}, "args": [...]}, ...]}, either with an optional "run_at" for all, at
most tasks_app.schemas.MAX_RUNS_PER_REQUEST.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from dataclasses import dataclass
from importlib import import_module
from types import SimpleNamespace

from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from django.contrib import auth
from django.core.exceptions import DisallowedHost, ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from django.http.multipartparser import MultiPartParserError
from django.utils import timezone

from scheduler_site.clientip import client_ip
from tasks_app import audit, lifecycle, roles, serializers, tokens
from tasks_app.apispec import Body
from tasks_app.exceptions import RunTooLarge, TaskDisabled, TaskNotFound
from tasks_app.jsonapi import (
    BAD_TOKEN,
    CHALLENGE,
    CSRF_FAILED,
    INVALID_FIELDS,
    MAX_BODY_BYTES,
    NO_CREDENTIAL,
    SERVER_ERROR,
    WRONG_HOST,
    BadRequest,
    Denied,
    bearer,
    csrf_passes,
    live_tokens,
    parse_json,
)
from tasks_app.lifecycle import TriggerRequest
from tasks_app.models import AuditEntry, Run
from tasks_app.schemas import BULK_TRIGGER, RUN_PARAMS
from tasks_app.validators import MAX_ID, clean_run_at, clean_run_params
from tasks_app.writer import WriterClientMixin, writer

log = logging.getLogger("django.request")
JSON_HEADERS = [(b"Content-Type", b"application/json")]


@dataclass(frozen=True)
class ApiTrigger:
    credential: tuple[str, str]  # ("token", digest) or ("session", session key)
    csrf_ok: bool
    task_id: int
    count: int = 1
    params: tuple[dict, ...] | None = None
    run_at: dt.datetime | None = None
    address: str = ""  # the client's, for the audit log


def apply_triggers(payloads: list[ApiTrigger]) -> list[list[Run] | Exception]:
    """The writer's "trigger" handler: authenticate every request of the batch
    (one query for all tokens), then create all their runs together, and
    record each request's runs in the audit log (one INSERT for the batch)."""
    live = live_tokens({p.credential[1] for p in payloads if p.credential[0] == "token"})
    actors = [_actor(kind, value, live) for kind, value in (p.credential for p in payloads)]
    user_ids = [user_id for _, user_id, _ in actors]
    # A token carries its user's role: one query for the whole batch.
    operators = roles.users_with(roles.OPERATOR, filter(None, user_ids))
    results: list[list[Run] | Exception | None] = [None] * len(payloads)
    requests, indexes = [], []
    for index, (payload, user_id) in enumerate(zip(payloads, user_ids, strict=True)):
        kind = payload.credential[0]
        if user_id is None:
            results[index] = Denied(401, BAD_TOKEN if kind == "token" else NO_CREDENTIAL)
        elif kind == "session" and not payload.csrf_ok:
            results[index] = Denied(403, CSRF_FAILED)
        elif user_id not in operators:
            results[index] = Denied(403, roles.refusal(roles.OPERATOR))
        else:
            requests.append(
                TriggerRequest(
                    payload.task_id,
                    Run.Trigger.API,
                    user_id,
                    payload.count,
                    payload.params,
                    run_at=payload.run_at,
                )
            )
            indexes.append(index)
    entries = []
    for index, outcome in zip(indexes, lifecycle.trigger_runs(requests), strict=True):
        results[index] = outcome
        if isinstance(outcome, list):
            actor, user_id, token_id = actors[index]
            payload = payloads[index]
            target = (
                "task",
                payload.task_id,
                f"task {payload.task_id} ({outcome[0].task_name if outcome else ''})",
            )
            changes = {"runs": [run.pk for run in outcome]}
            entries.append(
                audit.entry(
                    actor, user_id, token_id, payload.address, "run.trigger", target, changes
                )
            )
    if entries:
        # In the batch's transaction: runs and their entries are kept together.
        AuditEntry.objects.bulk_create(entries)
    return results


def _actor(kind: str, value: str, live: dict) -> tuple[str, int | None, int | None]:
    """(actor text, user id, token id) of a request's credential; no user id: refused."""
    if kind == "token":
        token = live.get(value)
        if token is None:
            return "", None, None
        actor = audit.token_actor(token.username, token.id, token.name)
        return actor, token.user_id, token.id
    return *_session_user(value), None


def _session_user(session_key: str) -> tuple[str, int | None]:
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # Django's own check, including the session's password hash.
    user = auth.get_user(SimpleNamespace(session=store))
    if user.is_authenticated and user.is_active:
        return user.get_username(), user.pk
    return "", None


def trigger_from(request: HttpRequest, body: bytes, task_id: int | None) -> ApiTrigger:
    """What a trigger request asks for, checked; for the URL's task, or (task_id
    None) the body's task and count or list of runs. Raises Denied, BadRequest
    or TaskNotFound."""
    raw = bearer(request.headers.get("Authorization", ""))
    if raw is not None:
        credential, csrf_ok = ("token", tokens.digest(raw)), True
    else:
        session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        if not session_key:
            raise Denied(401, NO_CREDENTIAL)
        credential, csrf_ok = ("session", session_key), csrf_passes(request)
    payload = _payload(request, body)
    if task_id is not None:
        payload = _checked(RUN_PARAMS, payload) if payload else {}
        run_at = _run_at(payload.pop("run_at")) if "run_at" in payload else None
        params = _params(payload) if payload else {}
        runs = {"params": (params,) if params else None, "run_at": run_at}
    else:
        task_id, runs = _bulk(_checked(BULK_TRIGGER, payload))
    if not 1 <= task_id <= MAX_ID:
        raise TaskNotFound(f"no task with id {task_id}")
    return ApiTrigger(credential, csrf_ok, task_id, **runs, address=client_ip(request))


def _payload(request: HttpRequest, body: bytes) -> dict:
    """The JSON body; an empty form (what a bare POST of some clients sends) is none."""
    if request.content_type == "multipart/form-data":
        try:
            form = request.POST or request.FILES
        except MultiPartParserError:
            form = True
        if form:
            raise BadRequest("send the request body as JSON")
        return {}
    return parse_json(body)


def _bulk(payload: dict) -> tuple[int, dict]:
    """The task and runs of a bulk request whose body matched BULK_TRIGGER."""
    run_at = _run_at(payload["run_at"]) if "run_at" in payload else None
    if "runs" in payload:
        params = tuple(_params(p, f"runs[{i}].") for i, p in enumerate(payload["runs"]))
        return payload["task"], {"params": params, "run_at": run_at}
    return payload["task"], {"count": payload.get("count", 1), "run_at": run_at}


def _checked(body: Body, payload: dict) -> dict:
    # The schemas' validators were compiled at import: a check costs tens of
    # microseconds, nothing beside the request's trip through the writer.
    errors = body.errors(payload)
    if errors:
        raise BadRequest(INVALID_FIELDS, errors)
    return payload


def _run_at(value) -> dt.datetime:
    try:
        return clean_run_at(value, timezone.now())
    except ValidationError as exc:
        raise BadRequest(INVALID_FIELDS, {"run_at": exc.messages}) from None


def _params(value, prefix: str = "") -> dict:
    try:
        return clean_run_params(value)
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            errors = {f"{prefix}{name}": messages for name, messages in exc.message_dict.items()}
        else:
            errors = {prefix.rstrip(".") or "params": exc.messages}
        raise BadRequest("invalid run parameters", errors) from None


def answer(created: list[Run], single: bool) -> dict:
    runs = [
        serializers.run_json(run, with_output=False, attempts=run.queued_attempts)
        for run in created
    ]
    return runs[0] if single else {"results": runs}


def failure(exc: Exception) -> tuple[int, dict, list[tuple[str, str]]]:
    """Status, body and extra headers for a refused trigger."""
    if isinstance(exc, Denied):
        headers = [("WWW-Authenticate", CHALLENGE)] if exc.status == 401 else []
        return exc.status, {"error": exc.message}, headers
    if isinstance(exc, BadRequest):
        return 400, {"error": exc.message, "errors": exc.errors}, []
    if isinstance(exc, TaskNotFound):
        return 404, {"error": str(exc)}, []
    if isinstance(exc, TaskDisabled):
        return 409, {"error": str(exc)}, []
    if isinstance(exc, RunTooLarge):
        return 400, {"error": str(exc)}, []
    raise exc


class _TriggerEndpoint(WriterClientMixin, AsyncHttpConsumer):
    """The same endpoints as the Django views in tasks_app.api, for POST under
    ASGI: same parsing, same writer job, same answers, without the view stack."""

    single = True
    received = 0

    async def http_request(self, message: dict) -> None:
        # A body past the API's limit is refused as it arrives, not once it is
        # all in memory.
        self.received += len(message.get("body", b""))
        if self.received > MAX_BODY_BYTES:
            error = {"error": f"request body over {MAX_BODY_BYTES} bytes", "errors": {}}
            await self.send_response(400, json.dumps(error).encode(), headers=JSON_HEADERS)
            await self.disconnect()
            raise StopConsumer
        await super().http_request(message)

    async def handle(self, body: bytes) -> None:
        headers = list(JSON_HEADERS)
        try:
            request = ASGIRequest(self.scope, io.BytesIO(body))
            request.get_host()  # ALLOWED_HOSTS, as Django checks it for its views
            task_id = self.scope["url_route"]["kwargs"].get("pk")
            trigger = trigger_from(request, body, task_id)
            created = await writer.submit("trigger", trigger)
            status, data = 201, answer(created, self.single)
        except (Denied, BadRequest, TaskNotFound, TaskDisabled, RunTooLarge) as exc:
            status, data, extra = failure(exc)
            headers += [(name.encode(), value.encode()) for name, value in extra]
        except DisallowedHost:
            status, data = 400, {"error": WRONG_HOST}
        except Exception:
            # Like a Django API view: a JSON 500, and the traceback in the log.
            log.exception("Internal Server Error: %s", self.scope.get("path"))
            status, data = 500, {"error": SERVER_ERROR}
        await self.send_response(status, json.dumps(data).encode(), headers=headers)


class TaskRunEndpoint(_TriggerEndpoint):
    """POST /api/tasks/<id>/run, optionally with {"env": {...}, "args": [...], "run_at": T}."""


class RunsEndpoint(_TriggerEndpoint):
    """POST /api/runs: many runs of one task in one transaction."""

    single = False
