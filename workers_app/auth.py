"""Authenticating agent websockets by the credential in their handshake."""

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware

from workers_app import registration


def bearer(header: str) -> str:
    """The credential of an `Authorization: Bearer <credential>` header, or ""."""
    scheme, _, credential = header.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bearer(value.decode("latin-1"))
    return ""


class AgentCredentialMiddleware(BaseMiddleware):
    """Puts the worker id in scope["worker_id"], or None for a wrong or revoked credential."""

    async def __call__(self, scope, receive, send):
        worker = await database_sync_to_async(registration.authenticate)(_bearer(scope))
        scope = dict(scope, worker_id=worker.pk if worker else None)
        return await super().__call__(scope, receive, send)
