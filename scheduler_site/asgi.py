"""HTTP (Django + static files) and websockets (agents) in one ASGI app."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
# Django must be set up before anything imports models.
django_http = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from workers_app.auth import AgentCredentialMiddleware  # noqa: E402
from workers_app.consumers import AgentConsumer  # noqa: E402

websocket_routes = URLRouter([path("ws/agent/", AgentConsumer.as_asgi())])

application = ProtocolTypeRouter(
    {
        # Static files are served by the app itself so that `make run` needs no
        # web server in front; a production setup may put one there instead.
        "http": ASGIStaticFilesHandler(django_http),
        # Agents send no Origin header, so no origin validator here: the
        # per-worker credential in the handshake is the authentication.
        "websocket": AgentCredentialMiddleware(websocket_routes),
    }
)
