"""`manage.py serve`: daphne (HTTP + websockets) plus the scheduler service."""

import asyncio
import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

log = logging.getLogger("workers_app.serve")


class Command(BaseCommand):
    help = "Serve the dashboard, the API and the agent websocket, and run the scheduler service."

    def add_arguments(self, parser):
        parser.add_argument(
            "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1)."
        )
        parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000).")

    def handle(self, *args, host: str, port: int, **options):
        if not host.strip():
            raise CommandError("--host must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, not {port}")
        # Importing daphne.server installs the asyncio Twisted reactor; do it
        # here, not at module import, so other commands are not affected.
        import daphne.server

        from scheduler_site import bodylimit
        from scheduler_site.asgi import application
        from workers_app import servers
        from workers_app.exceptions import ServerRefused
        from workers_app.service import SchedulerService

        try:
            servers.register(f"{host}:{port}")
        except ServerRefused as exc:
            raise CommandError(str(exc)) from None
        service = SchedulerService()

        def ready() -> None:
            asyncio.get_event_loop().create_task(service.run())
            self.stdout.write(f"serving on http://{host}:{port}/", ending="\n")
            self.stdout.flush()

        # daphne builds its HTTP factory inside run(); ours refuses an oversized
        # body before Twisted spools it to disk (see scheduler_site.bodylimit).
        # This process serves and then exits, so the module attribute daphne's
        # run() reads is set for good.
        daphne.server.HTTPFactory = bodylimit.daphne_http_factory(settings.SCHEDULER_MAX_BODY_BYTES)
        self._serve(application, host, port, ready)
        service.stopping.set()
        # A graceful stop leaves the table at once; a killed server is dead
        # to the others once silent (servers.SILENT_AFTER_S) or, on this
        # host, once its pid is gone.
        servers.unregister()

    def _serve(self, application, host: str, port: int, ready) -> None:
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server

        Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            ready_callable=ready,
            websocket_max_message_size=settings.SCHEDULER_MAX_FRAME_BYTES,
            websocket_max_frame_size=settings.SCHEDULER_MAX_FRAME_BYTES,
            # Agents heartbeat on their own; a ping from us too would only add frames.
            ping_interval=20,
            ping_timeout=30,
            # Agent sockets live for days; daphne would otherwise close them after 24 h.
            websocket_timeout=-1,
            verbosity=0,
        ).run()
