class WorkerError(Exception):
    """Base class for errors about workers and agents."""


class EnrollmentRefused(WorkerError):
    """The enrollment token is unknown, expired or revoked."""


class ProtocolError(WorkerError):
    """A frame from an agent is malformed, unknown or too large."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServerRefused(WorkerError):
    """This server process may not start beside the live ones (SQLite or the in-memory layer)."""
