"""Authenticating agent websockets by the credential in their handshake."""

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import WebsocketDenier

from workers_app import registration


def bearer(header: str) -> str:
    """The credential of an `Authorization: Bearer <credential>` header, or ""."""
    scheme, _, credential = header.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _has_origin(scope) -> bool:
    return any(name == b"origin" for name, _ in scope.get("headers", []))


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bearer(value.decode("latin-1"))
    return ""


class AgentCredentialMiddleware(BaseMiddleware):
    """Puts the worker id in scope["worker_id"], or None for a wrong or revoked credential.

    A handshake with an Origin header is refused before the credential is even
    looked at: agents send none, browsers always do, and a page on any site
    could otherwise open this socket (websockets are not bound by CORS) with a
    credential it got hold of. Refused as channels' OriginValidator refuses:
    closed before accept, which daphne answers with HTTP 403.
    """

    async def __call__(self, scope, receive, send):
        if _has_origin(scope):
            return await WebsocketDenier()(scope, receive, send)
        worker = await database_sync_to_async(registration.authenticate)(_bearer(scope))
        scope = dict(scope, worker_id=worker.pk if worker else None)
        return await super().__call__(scope, receive, send)
