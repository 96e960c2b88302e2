class TaskError(Exception):
    """Base class for errors of the run lifecycle."""


class TaskDisabled(TaskError):
    """The task is disabled and cannot be triggered."""


class InvalidApiToken(TaskError):
    """The bearer token is unknown or revoked."""
