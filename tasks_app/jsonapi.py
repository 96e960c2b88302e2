"""The JSON API's plumbing: authentication, bodies, errors.

Scripts send `Authorization: Bearer <token>` (minted with `manage.py
apitoken`); a logged-in browser session works too, and then CSRF applies
as it does for any form. Used by the Django API views (`api_view`) and by
the trigger endpoints, which are Channels HTTP consumers (tasks_app.trigger_api).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps

from django.contrib.auth import get_user_model
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from tasks_app import tokens
from tasks_app.batchsql import aware, column, marks, select, table
from tasks_app.models import ApiToken

MAX_BODY_BYTES = 1024 * 1024

NO_CREDENTIAL = "authentication required: send Authorization: Bearer <token> or log in"
BAD_SCHEME = "use Authorization: Bearer <token>"
BAD_TOKEN = "invalid or revoked API token"
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


def token_users(digests) -> dict[str, int]:
    """token digest -> user id, for the live tokens among these (the token not
    revoked, its user active); one query for any number of requests.

    "Last used" is written at most once per ApiToken.LAST_USED_RESOLUTION per
    token, not on every request.
    """
    digests = list(digests)
    if not digests:
        return {}
    user = get_user_model()
    found = select(
        f"SELECT t.id, t.token_hash, t.user_id, t.last_used_at FROM {table(ApiToken)} t"
        f" JOIN {table(user)} u ON u.{column(user, 'id')} = t.user_id"
        f" WHERE t.token_hash IN ({marks(digests)}) AND t.revoked_at IS NULL"
        f" AND u.{column(user, 'is_active')}",
        digests,
    )
    now = timezone.now()
    stale = [
        pk
        for pk, _, _, used in found
        if used is None or now - aware(used) >= ApiToken.LAST_USED_RESOLUTION
    ]
    if stale:
        ApiToken.objects.filter(pk__in=stale).update(last_used_at=now)
    return {digest: user_id for _, digest, user_id, _ in found}


def user_for_token(raw: str):
    user_id = token_users([tokens.digest(raw)]).values()
    return get_user_model().objects.filter(pk__in=user_id).first() if user_id else None


def csrf_passes(request: HttpRequest) -> bool:
    """Django's own CSRF check, for a request authenticated by its session."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None


def json_body(request: HttpRequest) -> dict:
    return parse_json(request.body)


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


def wrong_types(
    payload: dict, types: dict[str, tuple[type, ...]], messages: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """Field errors for JSON values of the wrong type.

    A form would coerce "4" to 4 (and True to 1): JSON callers must send real
    types. A boolean counts as a boolean only, never as a number.
    """
    errors = {}
    for name, allowed in types.items():
        if name not in payload:
            continue
        value = payload[name]
        if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            continue
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        errors[name] = [(messages or {}).get(name, f"Expected {names}.")]
    return errors


def form_errors(form) -> dict[str, list[str]]:
    return {field: [str(m) for m in messages] for field, messages in form.errors.items()}


def api_view(methods: list[str], *, public: bool = False) -> Callable:
    """JSON endpoint: method check, authentication, and BadRequest -> 400."""

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            if request.method not in methods:
                response = error(
                    405, f"method {request.method} not allowed; use {', '.join(methods)}"
                )
                response["Allow"] = ", ".join(methods)
                return response
            if not public:
                denied = authenticate(request)
                if denied is not None:
                    return denied
            try:
                return view(request, *args, **kwargs)
            except BadRequest as exc:
                return error(400, exc.message, errors=exc.errors)

        return wrapper

    return decorate


def authenticate(request: HttpRequest) -> JsonResponse | None:
    """None if the caller may use the API, else the 401 or 403 to answer."""
    try:
        raw = bearer(request.headers.get("Authorization", ""))
        if raw is not None:
            user = user_for_token(raw)
            if user is None:
                raise Denied(401, BAD_TOKEN)
            request.user = user
            return None
        if not request.user.is_authenticated:
            raise Denied(401, NO_CREDENTIAL)
        # A browser session is only as safe as its CSRF check.
        if not csrf_passes(request):
            raise Denied(403, CSRF_FAILED)
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
