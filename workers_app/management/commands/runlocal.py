"""`manage.py runlocal`: what `make run` starts on a laptop.

Migrates, makes sure an admin exists, starts `manage.py serve` and N local
agents as child processes, prints the URL and the login, and stops them all
on Ctrl-C (SIGINT) or SIGTERM.

The login banner is what a new user needs from this terminal, so it comes
last, once the server listens and the local agents are connected, in one
block. The children's output is relayed line by line through this process
under the same lock as the banner, so no log line can land inside it.
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from workers_app.agent import command_environ
from workers_app.models import EnrollmentToken, Worker

AGENT = Path(__file__).resolve().parents[2] / "agent.py"
DRAIN_TIMEOUT_S = 5
# How long the banner waits for the local agents before it is shown anyway.
AGENTS_TIMEOUT_S = 30
RULE = "=" * 64


class Console:
    """One terminal shared by us and our children: whole lines and blocks, never mixed."""

    def __init__(self, out) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.relays: list[threading.Thread] = []

    def write(self, text: str) -> None:
        with self.lock:
            self.out.write(text)
            self.out.flush()

    def relay(self, child: subprocess.Popen) -> None:
        def pump() -> None:
            for line in iter(child.stdout.readline, b""):
                self.write(line.decode("utf-8", "replace"))

        thread = threading.Thread(target=pump, name=f"relay-{child.pid}", daemon=True)
        thread.start()
        self.relays.append(thread)

    def drain(self) -> None:
        for thread in self.relays:
            thread.join(timeout=5)


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
        call_command("ensureadmin", stdout=io.StringIO())  # the banner shows the login
        url = f"http://127.0.0.1:{port}"
        console = Console(self.stdout._out)
        children: list[subprocess.Popen] = []
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            server = self._spawn(
                [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
                console,
            )
            children.append(server)
            if not self._wait_until_up(url, server):
                raise CommandError(f"the server did not come up on {url} (is the port in use?)")
            if agents:
                # Our own agents on this machine: nothing to approve, and the
                # token is good for them alone.
                token, _ = EnrollmentToken.mint(
                    note="make run", ttl_hours=1, max_uses=agents, auto_approve=True
                )
            names = [f"local-{number}" for number in range(1, agents + 1)]
            for name in names:
                state_dir = settings.DATA_DIR / "agents" / name
                children.append(
                    self._spawn(
                        [
                            sys.executable,
                            str(AGENT),
                            "--server",
                            url,
                            "--name",
                            name,
                            "--capacity",
                            str(capacity),
                            "--state-dir",
                            str(state_dir),
                            # Ctrl-C should not wait long for running commands.
                            "--drain-timeout",
                            str(DRAIN_TIMEOUT_S),
                        ],
                        console,
                        # The agents run on the master's machine, not in its
                        # confidence: none of its variables (SECRET_KEY,
                        # DATABASE_URL) for them or their commands.
                        # The token in the environment, not in argv where ps shows it.
                        environ={
                            **command_environ(dict(os.environb)),
                            b"SCHEDULER_ENROLLMENT_TOKEN": token.encode(),
                        },
                    )
                )
            online = self._wait_for_agents(names, children, lambda: stopping)
            if not stopping:
                console.write(self._banner(url, names, online, capacity))
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.2)
        finally:
            self._stop(children)
            console.drain()
            console.write("stopped.\n")
        if not stopping:
            raise CommandError("a child process exited; stopped everything")

    def _spawn(
        self, argv: list[str], console: Console, environ: dict | None = None
    ) -> subprocess.Popen:
        child = subprocess.Popen(
            argv,
            cwd=settings.BASE_DIR,
            # Own process groups: Ctrl-C reaches only us, and we stop the
            # children in order (agents drain into a live server first).
            process_group=0,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # PYTHONUNBUFFERED: lines as they happen, not in blocks.
            env={**(os.environb if environ is None else environ), b"PYTHONUNBUFFERED": b"1"},
        )
        console.relay(child)
        return child

    def _wait_for_agents(self, names: list[str], children, stopping) -> set[str]:
        """The local agents that are online, waiting up to AGENTS_TIMEOUT_S for all of them."""
        deadline = time.monotonic() + AGENTS_TIMEOUT_S
        online: set[str] = set()
        try:
            while names and not stopping() and time.monotonic() < deadline:
                online = set(
                    Worker.objects.filter(name__in=names, state=Worker.State.ONLINE).values_list(
                        "name", flat=True
                    )
                )
                if len(online) == len(names) or any(c.poll() is not None for c in children):
                    break
                time.sleep(0.1)
        finally:
            connection.close()  # nothing of ours stays open on the database while we wait
        return online

    def _banner(self, url: str, names: list[str], online: set[str], capacity: int) -> str:
        password_file = settings.DATA_DIR / "admin-password.txt"
        if password_file.exists():
            login = [
                f"  Log in:   admin / {password_file.read_text().strip()}",
                f"            (the password is kept in {password_file})",
            ]
        else:
            login = ["  Log in:   with your existing account (no generated password on file)"]
        if not names:
            agents = "none started; add workers from the Workers page"
        elif len(online) == len(names):
            agents = f"{', '.join(names)} connected, {capacity} slots each"
        else:
            missing = ", ".join(name for name in names if name not in online)
            agents = f"{missing} NOT connected yet (see the lines above)"
        lines = [
            "",
            RULE,
            f"  Scheduler is ready: {url}/",
            *login,
            f"  Agents:   {agents}",
            "  API:      `make token` prints a token for the JSON API",
            f"  Stop:     Ctrl-C (running commands get {DRAIN_TIMEOUT_S} s to finish)",
            RULE,
            "",
        ]
        return "\n".join(lines) + "\n"

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
