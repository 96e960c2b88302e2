class TaskError(Exception):
    """Base class for errors of the run lifecycle."""


class TaskNotFound(TaskError):
    """No task has that id (it may have been deleted)."""


class RunTooLarge(TaskError):
    """The run's command, arguments and environment would not fit one frame to its agent."""


class TaskDisabled(TaskError):
    """The task is disabled and cannot be triggered."""


class RunNotCancellable(TaskError):
    """The run has already finished."""


class RunNotRetryable(TaskError):
    """Only a finished run can be retried."""


class BadSelection(ValueError):
    """The run ids of a bulk action are not usable: none, too many, or not ids."""


class InvalidSchedule(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


class SecretsUnreadable(TaskError):
    """A task's secret environment was encrypted under a key this server does not hold."""
