class CopyRefused(Exception):
    """The SQLite file cannot be copied into that database (see the message)."""


class NotReady(Exception):
    """A /readyz check found this server not ready (see the message)."""
