"""The command the dashboard's *Add worker* shows: a fresh node to a running agent.

Stock Debian and Ubuntu mark the system Python "externally managed" (PEP 668),
so a bare `pip install` fails there. The command makes its own virtualenv in a
fixed directory instead, installs the agent's third-party imports into it,
downloads the single-file agent from this server next to it, checks its
SHA-256 and starts it.
Re-running it is harmless: the venv and packages are reused, the agent file is
refreshed, and the agent reconnects with the credential in its state dir.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

# The agent's only third-party imports (tests/test_first_hour_ops.py checks
# this against workers_app/agent.py and the lower bounds in pyproject.toml).
AGENT_REQUIREMENTS = ("websockets>=13.0", "requests>=2.31")

AGENT_HOME = "~/.local/share/scheduler-agent"

# When the admin leaves the name empty: the node's host name plus 4 random hex
# digits drawn on the node, so that one command can enroll several nodes that
# share a host name (cloned VMs, "debian", "localhost") without one taking
# over the other's worker. Only POSIX sh and coreutils: no bash-only $RANDOM.
DEFAULT_NAME = "\"$(hostname)-$(od -An -N2 -tx2 /dev/urandom | tr -d ' ')\""

CONTINUATION = " \\\n"


AGENT_SOURCE = Path(__file__).with_name("agent.py")


def agent_sha256() -> str:
    """The digest of the agent this server hands out at /agent.py."""
    return hashlib.sha256(AGENT_SOURCE.read_bytes()).hexdigest()


def agent_command(server: str, token: str, *, name: str = "", capacity: int = 4) -> str:
    """The shell command, one step per line joined with backslash continuations.

    The downloaded agent runs only if its SHA-256 is the one this server
    computed from its own copy (a proxy or mirror in between cannot swap it).
    The token goes to the agent in its environment, never on its command
    line, where any user of the node could read it with `ps`.
    """
    home = AGENT_HOME
    lines = [
        f"python3 -m venv {home} &&",
        f"{home}/bin/pip install -q {' '.join(shlex.quote(r) for r in AGENT_REQUIREMENTS)} &&",
        f"curl -fsSL -o {home}/agent.py {shlex.quote(server + '/agent.py')} &&",
        # sha256sum -c reads "<digest>  <file>" lines: relative to the agent's dir,
        # since "~" would not be expanded inside the echoed line.
        f"(cd {home} && echo '{agent_sha256()}  agent.py' | sha256sum -c --quiet -) &&",
        f"SCHEDULER_ENROLLMENT_TOKEN={shlex.quote(token)}",
        f"  {home}/bin/python {home}/agent.py",
        f"  --server {shlex.quote(server)}",
        f"  --name {shlex.quote(name) if name else DEFAULT_NAME}",
        f"  --capacity {int(capacity)}",
    ]
    return CONTINUATION.join(lines)
