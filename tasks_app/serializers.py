"""JSON shapes of the API; field names are documented in the README."""

from __future__ import annotations

from tasks_app import cron, results, shards, timeline
from tasks_app.logs import outputs_of
from tasks_app.models import TASK_FIELDS, Attempt, Event, Run, SchedulerState, Task


def _time(value):
    return value.isoformat() if value else None


def task_json(task: Task, *, with_next_runs: bool = False) -> dict:
    data = {
        "id": task.pk,
        **{name: getattr(task, name) for name in TASK_FIELDS},
        # secret_env is write-only: its names, never its values.
        "secret_env_keys": list(task.secret_env_keys),
        # Encrypted under another SECRET_KEY: runs fail until a new set is given.
        "secret_env_unreadable": task.secrets_unreadable(),
        "created_at": _time(task.created_at),
        "updated_at": _time(task.updated_at),
    }
    if with_next_runs:
        data["next_runs"] = [fire.as_json() for fire in cron.next_runs(task)]
    return data


def attempt_json(attempt: Attempt, *, with_output: bool, output: dict | None = None) -> dict:
    """An attempt; with its output (read here unless given, from outputs_of)."""
    data = {
        "id": attempt.pk,
        "shard_index": attempt.shard_index,
        "try_number": attempt.try_number,
        "worker": attempt.worker_name or None,
        "status": attempt.status,
        "exit_code": attempt.exit_code,
        "reason": attempt.reason,
        "queued_at": _time(attempt.queued_at),
        "not_before": _time(attempt.not_before),
        "assigned_at": _time(attempt.assigned_at),
        "accepted_at": _time(attempt.accepted_at),
        "started_at": _time(attempt.started_at),
        "finished_at": _time(attempt.finished_at),
        "output_bytes": max(attempt.output_bytes, attempt.stored_bytes),
        "truncated": attempt.truncated,
        # The master gave up on it (lost, timeout backstop) and the agent's own
        # result arrived later: kept here, never applied.
        "superseded": attempt.is_superseded,
        "late_result": {
            "status": attempt.late_status,
            "exit_code": attempt.late_exit_code,
            "reason": attempt.late_reason,
            "reported_at": _time(attempt.late_reported_at),
        }
        if attempt.is_superseded
        else None,
    }
    if with_output:
        text = output if output is not None else outputs_of([attempt])[attempt.pk]
        data.update(output=text["combined"], stdout=text["stdout"], stderr=text["stderr"])
    return data


def shard_summaries(definition: dict, attempts) -> tuple[list[dict], dict | None]:
    """Each shard as its latest attempt says, in shard order, and the merge
    (None without a merge command), from attempts already read."""
    latest = shards.latest_by_shard(attempts)

    def summary(index: int) -> dict:
        attempt = latest.get(index)
        return {
            "index": index,
            "status": attempt.status if attempt else None,
            "worker": (attempt.worker_name or None) if attempt else None,
            "attempts": attempt.try_number if attempt else 0,
        }

    count = shards.shard_count(definition)
    merge = summary(count) if shards.has_merge(definition) else None
    return [summary(i) for i in range(count)], merge


# What a sharded run's attempt carries instead of its output when its shard
# was not asked for (GET /api/runs/<id>?shard=N).
NO_OUTPUT = {"combined": None, "stdout": None, "stderr": None}


def run_json(run: Run, *, with_output: bool, attempts=None, shard: int | None = None) -> dict:
    """A run and its attempts (read from the database unless given); with
    output, also its result (null until it succeeded). A sharded run's
    attempts come with output only for `shard`: 1,000 shards' output at once
    could be gigabytes."""
    if attempts is None:
        attempts = run.attempts.all()
    shard_list, merge = shard_summaries(run.definition, attempts)
    outputs = {}
    if with_output:
        definition = run.definition
        sharded = shards.shard_count(definition) > 1 or shards.has_merge(definition)
        shown = [a for a in attempts if not sharded or a.shard_index == shard]
        # In one query, whatever the number of attempts shown.
        outputs = {a.pk: NO_OUTPUT for a in attempts} | outputs_of(shown)
    data = {
        "id": run.pk,
        "task": run.task_id,
        "task_deleted": getattr(run, "task_deleted", False),
        "task_name": run.task_name,
        "status": run.status,
        "reason": run.reason,
        "trigger": run.trigger,
        "retry_of": run.retry_of_id,
        "cancel_requested_at": _time(run.cancel_requested_at),
        "cancel_requested_by": run.cancel_requested_by or None,
        "command": run.definition.get("command"),
        "params": run.params,
        "scheduled_for": _time(run.scheduled_for),
        "run_at": _time(run.run_at),
        "created_at": _time(run.created_at),
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "shards": shard_list,
        "merge": merge,
        "attempts": [
            attempt_json(a, with_output=with_output, output=outputs.get(a.pk)) for a in attempts
        ],
    }
    if with_output:
        ids = results.result_attempt_ids(run)
        text, cut = results.head(ids) if ids is not None else (None, False)
        data.update(result=text, result_truncated=cut)
    return data


def scheduler_json() -> dict:
    state = SchedulerState.current()
    return {
        "paused": state.paused,
        "paused_at": _time(state.paused_at),
        "paused_by": state.paused_by,
        "runs_running": Run.objects.filter(status=Run.Status.RUNNING).count(),
        "runs_queued": Run.objects.filter(status=Run.Status.QUEUED).count(),
    }


def event_json(event: Event) -> dict:
    return {
        "id": event.pk,
        "at": _time(event.at),
        "kind": event.kind,
        "run_id": event.run_id,
        "attempt_id": event.attempt_id,
        "task_id": event.task_id,
        "worker_id": event.worker_id,
        "data": event.data,
        "text": timeline.describe(event),
    }


def audit_json(entry) -> dict:
    return {
        "id": entry.pk,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "at": entry.at.isoformat(),
        "address": entry.address,
        "changes": entry.changes,
    }
