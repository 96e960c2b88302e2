"""JSON shapes of the API; field names are documented in the README."""

from __future__ import annotations

from tasks_app.lifecycle import output_of
from tasks_app.models import Attempt, Run, Task


def _time(value):
    return value.isoformat() if value else None


def task_json(task: Task) -> dict:
    return {
        "id": task.pk,
        "name": task.name,
        "command": task.command,
        "shell": task.shell,
        "env": task.env,
        "working_dir": task.working_dir,
        "timeout": task.timeout,
        "labels": task.labels,
        "enabled": task.enabled,
        "created_at": _time(task.created_at),
        "updated_at": _time(task.updated_at),
    }


def attempt_json(attempt: Attempt, *, with_output: bool) -> dict:
    data = {
        "id": attempt.pk,
        "shard_index": attempt.shard_index,
        "try_number": attempt.try_number,
        "worker": attempt.worker_name or None,
        "status": attempt.status,
        "exit_code": attempt.exit_code,
        "reason": attempt.reason,
        "queued_at": _time(attempt.queued_at),
        "assigned_at": _time(attempt.assigned_at),
        "started_at": _time(attempt.started_at),
        "finished_at": _time(attempt.finished_at),
        "output_bytes": max(attempt.output_bytes, attempt.stored_bytes),
        "truncated": attempt.truncated,
    }
    if with_output:
        text = output_of(attempt)
        data.update(output=text["combined"], stdout=text["stdout"], stderr=text["stderr"])
    return data


def run_json(run: Run, *, with_output: bool) -> dict:
    return {
        "id": run.pk,
        "task": run.task_id,
        "task_name": run.task_name,
        "status": run.status,
        "trigger": run.trigger,
        "command": run.definition.get("command"),
        "created_at": _time(run.created_at),
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "attempts": [attempt_json(a, with_output=with_output) for a in run.attempts.all()],
    }
