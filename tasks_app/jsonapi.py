"""Authentication and plumbing for the JSON API.

Scripts send `Authorization: Bearer <token>` (minted with `manage.py
apitoken`); a logged-in browser session works too, and then CSRF applies
as it does for any form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps

from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from tasks_app import tokens
from tasks_app.models import ApiToken

MAX_BODY_BYTES = 1024 * 1024


class BadRequest(Exception):
    """The request body is not what the endpoint takes."""

    def __init__(self, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}


def error(status: int, message: str, **extra) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def user_for_token(raw: str):
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=tokens.digest(raw), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user


def json_body(request: HttpRequest) -> dict:
    if len(request.body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(request.body or b"{}")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
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
                denied = _authenticate(request)
                if denied is not None:
                    return denied
            try:
                return view(request, *args, **kwargs)
            except BadRequest as exc:
                return error(400, exc.message, errors=exc.errors)

        return wrapper

    return decorate


def _authenticate(request: HttpRequest) -> JsonResponse | None:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if header:
        if scheme.lower() != "bearer" or not raw.strip():
            return _unauthorized("use Authorization: Bearer <token>")
        user = user_for_token(raw.strip())
        if user is None:
            return _unauthorized("invalid or revoked API token")
        request.user = user
        return None
    if not request.user.is_authenticated:
        return _unauthorized(
            "authentication required: send Authorization: Bearer <token> or log in"
        )
    # A browser session is only as safe as its CSRF check.
    rejected = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
    if rejected is not None:
        return error(403, "CSRF check failed; send the X-CSRFToken header with a session")
    return None


def _unauthorized(message: str) -> JsonResponse:
    response = error(401, message)
    response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response
