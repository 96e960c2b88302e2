"""The JSON API's plumbing: authentication, bodies, errors.

Scripts send `Authorization: Bearer <token>` (minted with `manage.py
apitoken`); a logged-in browser session works too, and then CSRF applies
as it does for any form. Used by the Django API views (`api_view`) and by
the trigger endpoints, which are Channels HTTP consumers (tasks_app.trigger_api).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signals
from django.core.exceptions import DisallowedHost, PermissionDenied, RequestDataTooBig
from django.db import connection
from django.http import Http404, HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.utils.log import log_response
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from tasks_app import roles, tokens
from tasks_app.apispec import Body, Operation
from tasks_app.batchsql import aware, column, marks, select, table
from tasks_app.models import ApiToken

# The server refuses a larger body with 413 before reading it
# (scheduler_site.bodylimit); this check is for callers that bypass it.
MAX_BODY_BYTES = settings.SCHEDULER_MAX_BODY_BYTES

NO_CREDENTIAL = "authentication required: send Authorization: Bearer <token> or log in"
BAD_SCHEME = "use Authorization: Bearer <token>"
BAD_TOKEN = "invalid, expired or revoked API token"
CSRF_FAILED = "CSRF check failed; send the X-CSRFToken header with a session"


class Denied(Exception):
    """The caller is not authenticated (401) or its session failed the CSRF check (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(Exception):
    """The request body is not what the endpoint takes."""

    def __init__(self, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}


def error(status: int, message: str, **extra) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def bearer(header: str) -> str | None:
    """The token of an Authorization header, None without one; Denied if malformed."""
    if not header:
        return None
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Denied(401, BAD_SCHEME)
    return raw.strip()


class LiveToken(NamedTuple):
    """A token that may be used now, with what an audit entry says of it."""

    id: int
    name: str
    user_id: int
    username: str


def live_tokens(digests) -> dict[str, LiveToken]:
    """token digest -> the live token, for those among these (not revoked or
    expired, its user active); one query for any number of requests.

    "Last used" is written at most once per ApiToken.LAST_USED_RESOLUTION per
    token, not on every request.
    """
    digests = list(digests)
    if not digests:
        return {}
    user = get_user_model()
    now = timezone.now()
    found = select(
        f"SELECT t.id, t.token_hash, t.user_id, t.last_used_at, t.name,"
        f" u.{column(user, user.USERNAME_FIELD)} FROM {table(ApiToken)} t"
        f" JOIN {table(user)} u ON u.{column(user, 'id')} = t.user_id"
        f" WHERE t.token_hash IN ({marks(digests)}) AND t.revoked_at IS NULL"
        f" AND (t.expires_at IS NULL OR t.expires_at > %s)"
        f" AND u.{column(user, 'is_active')}",
        [*digests, connection.ops.adapt_datetimefield_value(now)],
    )
    stale = [
        row[0]
        for row in found
        if row[3] is None or now - aware(row[3]) >= ApiToken.LAST_USED_RESOLUTION
    ]
    if stale:
        ApiToken.objects.filter(pk__in=stale).update(last_used_at=now)
    return {
        digest: LiveToken(pk, name, user_id, username)
        for pk, digest, user_id, _, name, username in found
    }


def user_for_token(raw: str):
    """The user of a live token, with the token as `api_token` (for the audit log)."""
    live = live_tokens([tokens.digest(raw)])
    if not live:
        return None
    [token] = live.values()
    user = get_user_model().objects.filter(pk=token.user_id).first()
    if user is not None:
        user.api_token = token
    return user


def csrf_passes(request: HttpRequest) -> bool:
    """Django's own CSRF check, for a request authenticated by its session."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object (empty: {}); BadRequest if it is not one."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        # "\ud800" escapes decode to lone surrogates, which no database stores.
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest("request body contains text that is not valid Unicode") from None
    return payload


def form_errors(form) -> dict[str, list[str]]:
    return {field: [str(m) for m in messages] for field, messages in form.errors.items()}


def api_view(operations: dict[str, Operation]) -> Callable:
    """A JSON endpoint serving these operations (method -> Operation): the method
    check, authentication, the request body checked against the operation's
    schema (as `request.payload`), and every failure answered as JSON.

    The operations are kept on the view (`api_operations`): the published
    OpenAPI document is built from them.
    """
    methods = list(operations)

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            operation = operations.get(request.method)
            if operation is None:
                response = error(
                    405, f"method {request.method} not allowed; use {', '.join(methods)}"
                )
                response["Allow"] = ", ".join(methods)
                return response
            try:
                if not (operation.public or operation.served_by_trigger_api):
                    denied = authenticate(request, operation.role)
                    if denied is not None:
                        return denied
                if operation.body is not None and not operation.served_by_trigger_api:
                    request.payload = checked_body(operation.body, request.body)
                return view(request, *args, **kwargs)
            except RequestDataTooBig:
                # Served without our ASGI cap in front (Django's test client, WSGI).
                return error(413, f"request body over {MAX_BODY_BYTES} bytes")
            except BadRequest as exc:
                return error(400, exc.message, errors=exc.errors)
            except Http404 as exc:
                return error(404, str(exc) or "not found")
            except PermissionDenied as exc:
                return error(403, str(exc) or "permission denied")
            except Exception:
                return server_error(request)

        wrapper.api_operations = operations
        return wrapper

    return decorate


INVALID_FIELDS = "invalid fields"
SERVER_ERROR = "internal server error; it has been logged"


def checked_body(body: Body, raw: bytes) -> dict:
    """The request body as a JSON object that matches the schema; else BadRequest."""
    payload = parse_json(raw)
    errors = body.errors(payload)
    if errors:
        raise BadRequest(INVALID_FIELDS, errors)
    return payload


def server_error(request: HttpRequest) -> JsonResponse:
    """A JSON 500 for an exception of an API view, reported as Django reports its own
    (the got_request_exception signal, the django.request logger with exc_info)."""
    signals.got_request_exception.send(sender=None, request=request)
    response = error(500, SERVER_ERROR)
    log_response(
        "%s: %s",
        "Internal Server Error",
        request.path,
        response=response,
        request=request,
        exception=sys.exc_info()[1],
    )
    return response


WRONG_HOST = "this server does not answer to that Host header"


def bad_request(request: HttpRequest, exception: Exception):
    """handler400: under /api/ a JSON 400 (a Host not in ALLOWED_HOSTS gets here,
    from CommonMiddleware, before any view); elsewhere Django's own page."""
    if not request.path.startswith("/api/"):
        return defaults.bad_request(request, exception)
    return error(400, WRONG_HOST if isinstance(exception, DisallowedHost) else "bad request")


@csrf_exempt
def no_such_endpoint(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Every other URL under /api/: a JSON 404 (never Django's HTML page, never an
    APPEND_SLASH redirect), naming the endpoint a trailing slash hides."""
    stripped = request.path_info.rstrip("/")
    if stripped != request.path_info and stripped != "/api":
        try:
            match = resolve(stripped)
        except Resolver404:
            match = None
        if match is not None and match.func is not no_such_endpoint:
            return error(404, f"no such endpoint; did you mean {request.path.rstrip('/')}?")
    return error(404, f"no such endpoint: {request.path}; the endpoints are listed at /api/docs")


def authenticate(request: HttpRequest, role: str) -> JsonResponse | None:
    """None if the caller may use the API with this role, else the 401 or 403 to answer."""
    try:
        raw = bearer(request.headers.get("Authorization", ""))
        if raw is not None:
            user = user_for_token(raw)
            if user is None:
                raise Denied(401, BAD_TOKEN)
            request.user = user
            # Who acted, for tasks_app.audit: this token of that user.
            request.api_token = user.api_token
        elif not request.user.is_authenticated:
            raise Denied(401, NO_CREDENTIAL)
        # A browser session is only as safe as its CSRF check.
        elif not csrf_passes(request):
            raise Denied(403, CSRF_FAILED)
        # A token carries its user's role.
        if not roles.allows(request.user, role):
            raise Denied(403, roles.refusal(role))
    except Denied as exc:
        return denied_response(exc)
    return None


# Sent with every 401, as RFC 6750 asks of a bearer-token API.
CHALLENGE = 'Bearer realm="api"'


def denied_response(exc: Denied) -> JsonResponse:
    response = error(exc.status, exc.message)
    if exc.status == 401:
        response["WWW-Authenticate"] = CHALLENGE
    return response
