"""HTTP (Django, static files, the trigger endpoints) and websockets (agents, and the
dashboard's live pages) in one ASGI app."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
# Django must be set up before anything imports models.
django_http = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import (  # noqa: E402
    AllowedHostsOriginValidator,
    WebsocketDenier,
)
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from scheduler_site.bodylimit import BodyLimit  # noqa: E402
from tasks_app.consumers import LiveConsumer  # noqa: E402
from tasks_app.trigger_api import RunsEndpoint, TaskRunEndpoint  # noqa: E402
from workers_app.auth import AgentCredentialMiddleware  # noqa: E402
from workers_app.consumers import AgentConsumer  # noqa: E402

# Static files are served by the app itself so that `make run` needs no web
# server in front; a production setup may put one there instead.
django_app = ASGIStaticFilesHandler(django_http)


def post_to(endpoint, otherwise):
    """POST goes to the endpoint, any other method to `otherwise` (Django)."""

    async def app(scope, receive, send):
        target = endpoint if scope["method"] == "POST" else otherwise
        return await target(scope, receive, send)

    return app


websocket_routes = URLRouter(
    [
        # Agents send no Origin header: the middleware refuses any handshake
        # that carries one (a browser), and the per-worker credential in the
        # handshake is the authentication.
        path("ws/agent/", AgentCredentialMiddleware(AgentConsumer.as_asgi())),
        # Browsers always send one: it must name one of ALLOWED_HOSTS (a page of
        # another site cannot open it with the user's cookies), and the session
        # is the authentication (the consumer refuses users without a role).
        path(
            "ws/live/",
            AllowedHostsOriginValidator(AuthMiddlewareStack(LiveConsumer.as_asgi())),
        ),
        # Any other path: refused (403), as the agent middleware refused it before.
        re_path(r"", WebsocketDenier.as_asgi()),
    ]
)

http_routes = URLRouter(
    [
        # The API's hot path: Channels HTTP consumers (see tasks_app.trigger_api).
        path("api/tasks/<int:pk>/run", post_to(TaskRunEndpoint.as_asgi(), django_app)),
        path("api/runs", post_to(RunsEndpoint.as_asgi(), django_app)),
        re_path(r"", django_app),
    ]
)

application = ProtocolTypeRouter(
    {
        # Outermost: a body over the limit is refused before any app reads it.
        "http": BodyLimit(http_routes, settings.SCHEDULER_MAX_BODY_BYTES),
        "websocket": websocket_routes,
    }
)
