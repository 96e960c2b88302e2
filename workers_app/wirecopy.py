"""The agent's verbatim copy of scheduler_site/wire.py: reading and writing it."""

from pathlib import Path

from scheduler_site import wire

AGENT = Path(__file__).with_name("agent.py")
WIRE = Path(wire.__file__)
BEGIN = "# --- wire vocabulary: a verbatim copy of scheduler_site/wire.py (`make wire`) ---\n"
END = "# --- end of wire vocabulary ---\n"


def _split(text: str) -> tuple[str, str, str]:
    head, _, rest = text.partition(BEGIN)
    copy, _, tail = rest.partition(END)
    if not rest or not tail:
        raise ValueError(f"{AGENT} has lost its wire vocabulary markers")
    return head, copy, tail


def _block(source: str) -> str:
    # Two blank lines before the end marker, as the formatter wants them there.
    return source.rstrip("\n") + "\n\n\n"


def embedded() -> str:
    """The copy as it is in agent.py now."""
    return _split(AGENT.read_text())[1]


def original() -> str:
    """wire.py as the agent must carry it."""
    return _block(WIRE.read_text())


def embed() -> bool:
    """Write the current wire.py into agent.py; True if that changed the file."""
    head, copy, tail = _split(AGENT.read_text())
    if copy == original():
        return False
    AGENT.write_text(head + BEGIN + original() + END + tail)
    return True
