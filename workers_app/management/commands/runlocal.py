"""`manage.py runlocal`: what `make run` starts on a laptop.

Migrates, makes sure an admin exists, starts `manage.py serve` and N local
agents as child processes, prints the URL and the login, and stops them all
on Ctrl-C (SIGINT) or SIGTERM.
"""

import io
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from workers_app.models import EnrollmentToken

AGENT = Path(__file__).resolve().parents[2] / "agent.py"
DRAIN_TIMEOUT_S = 5


class Command(BaseCommand):
    help = "Run the master and local agents together (what `make run` does)."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--agents", type=int, default=1, help="How many local agents to start (0-32)."
        )
        parser.add_argument("--capacity", type=int, default=4, help="Slots per local agent.")

    def handle(self, *args, port: int, agents: int, capacity: int, **options):
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, not {port}")
        if not 0 <= agents <= 32:
            raise CommandError(f"--agents must be between 0 and 32, not {agents}")
        call_command("migrate", verbosity=0)
        login = io.StringIO()
        call_command("ensureadmin", stdout=login)
        url = f"http://127.0.0.1:{port}"
        children: list[subprocess.Popen] = []
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            server = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=settings.BASE_DIR,
                # Own process groups: Ctrl-C reaches only us, and we stop the
                # children in order (agents drain into a live server first).
                process_group=0,
            )
            children.append(server)
            if not self._wait_until_up(url, server):
                raise CommandError(f"the server did not come up on {url} (is the port in use?)")
            if agents:
                token, _ = EnrollmentToken.mint(note="make run", ttl_hours=1)
            for number in range(1, agents + 1):
                state_dir = settings.DATA_DIR / "agents" / f"local-{number}"
                children.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(AGENT),
                            "--server",
                            url,
                            "--token",
                            token,
                            "--name",
                            f"local-{number}",
                            "--capacity",
                            str(capacity),
                            "--state-dir",
                            str(state_dir),
                            # Ctrl-C should not wait long for running commands.
                            "--drain-timeout",
                            str(DRAIN_TIMEOUT_S),
                        ],
                        process_group=0,
                    )
                )
            self.stdout.write(
                self.style.SUCCESS(f"\nScheduler running at {url}/  ({agents} local agent(s))")
            )
            self.stdout.write(login.getvalue().strip())
            self.stdout.write("Press Ctrl-C to stop.\n")
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.2)
        finally:
            self._stop(children)
        if not stopping:
            raise CommandError("a child process exited; stopped everything")

    def _wait_until_up(self, url: str, server: subprocess.Popen, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/login/", timeout=1):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def _stop(self, children: list[subprocess.Popen]) -> None:
        # Agents first, while the server is still up to take their last results
        # (they drain: running commands get DRAIN_TIMEOUT_S to finish); then the server.
        server, agents = children[:1], children[1:]
        for group in (agents, server):
            for child in group:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S + 10
            for child in group:
                try:
                    child.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self.stdout.write("stopped.")
