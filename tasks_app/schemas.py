"""The JSON shapes of tasks and runs: request bodies (checked) and answers (documented).

A task's JSON types come from TASK_FIELDS (the one list of a task's fields);
this module adds what JSON Schema can say about each of them, from the same
limits the form applies. The answers' schemas describe what
tasks_app.serializers writes; tests hold every answer to them.
"""

from __future__ import annotations

from scheduler_site.wire import LABEL_PATTERN, MAX_LABELS
from tasks_app.apispec import MESSAGES, Body, query_param
from tasks_app.cron import MAX_SCHEDULE_CHARS
from tasks_app.forms import (
    MAX_BACKOFF_S,
    MAX_CONCURRENCY,
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
)
from tasks_app.models import MAX_SHARDS, TASK_FIELDS, Attempt, MisfirePolicy, Run, Strategy, Task
from tasks_app.results import RESULT_INLINE_CHARS
from tasks_app.validators import (
    ENV_NAME_RE,
    MAX_ARG_CHARS,
    MAX_ARGS,
    MAX_DELAY_DAYS,
    MAX_ENV,
    MAX_ID,
)

MAX_RUNS_PER_REQUEST = 1000
PAGE_LIMIT_MAX = 200
PAGE_LIMIT_DEFAULT = 50

_JSON_TYPES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    dict: "object",
    list: "array",
    type(None): "null",
}


def json_type(types: tuple[type, ...]) -> str | list[str]:
    """The JSON Schema type of a tuple of Python types ((int, float) is a number)."""
    names = []
    for kind in types:
        name = _JSON_TYPES[kind]
        if name == "number" and "integer" in names:
            names.remove("integer")
        if name not in names:
            names.append(name)
    return names[0] if len(names) == 1 else names


ID = {"type": "integer", "minimum": 1}
TIME = {"type": "string", "format": "date-time", "description": "ISO 8601 with a UTC offset"}
NULLABLE_TIME = {**TIME, "type": ["string", "null"]}
ENV = {
    "type": "object",
    "description": f"NAME: value strings, at most {MAX_ENV}",
    "maxProperties": MAX_ENV,
    "propertyNames": {
        "pattern": ENV_NAME_RE.pattern,
        MESSAGES: {
            "pattern": "Invalid variable name {value!r}: "
            "use letters, digits and '_', not starting with a digit."
        },
    },
    "additionalProperties": {"type": "string"},
    MESSAGES: {"maxProperties": f"At most {MAX_ENV} environment variables."},
}
LABELS = {
    "type": "array",
    "description": f"labels a worker must all have; at most {MAX_LABELS} distinct ones "
    "(empty strings and repeats are dropped)",
    "items": {
        "type": "string",
        "pattern": f"^(?:{LABEL_PATTERN})?$",
        MESSAGES: {
            "pattern": "Invalid label {value!r}: use 1-64 letters, digits, '.', '_' or '-'."
        },
    },
}

# What JSON Schema can say of each task field, beyond its type (TASK_FIELDS).
_TASK_FIELD_RULES: dict[str, dict] = {
    "name": {"minLength": 1, "maxLength": 200, "description": "unique"},
    "command": {
        "minLength": 1,
        "description": "split into argv like a shell would (shlex), unless shell is set",
    },
    "shell": {"description": "run the command through /bin/sh -c", "default": False},
    "env": {**ENV, "default": {}},
    "working_dir": {
        "maxLength": 1024,
        "description": "an absolute path, or empty for the agent's own",
        "default": "",
    },
    "timeout": {
        "minimum": 1,
        "maximum": MAX_TIMEOUT_S,
        "description": "seconds; null for none",
        "default": None,
    },
    "labels": {**LABELS, "default": []},
    "max_retries": {
        "minimum": 0,
        "maximum": MAX_RETRIES,
        "description": "retries after a failed, timed-out or lost attempt",
        "default": 0,
    },
    "retry_backoff_s": {
        "minimum": 0,
        "maximum": MAX_BACKOFF_S,
        "description": "delay before the first retry; doubles each time, with jitter",
        "default": 10.0,
    },
    "retry_backoff_max_s": {
        "minimum": 0,
        "maximum": MAX_BACKOFF_S,
        "description": "cap on the retry delay",
        "default": 600.0,
    },
    "concurrency_limit": {
        "minimum": 0,
        "maximum": MAX_CONCURRENCY,
        "description": "runs of this task at once (queued-and-ready or running); "
        "null or 0 for no limit, 1 never overlaps",
        "default": None,
    },
    "busy_policy": {
        "enum": list(Task.BusyPolicy.values),
        "description": "when a trigger finds the limit reached: queue (wait, first in first "
        "out, until a run of the task ends), skip (record a skipped run with the reason) "
        "or replace (cancel the running ones, start the new one)",
        "default": Task.BusyPolicy.QUEUE.value,
        MESSAGES: {"enum": "Choose queue, skip or replace."},
    },
    "priority": {
        "minimum": 0,
        "maximum": MAX_PRIORITY,
        "description": "higher is dispatched first, first in first out within a priority; "
        "each point is worth SCHEDULER_PRIORITY_AGING_S (default 60 s) of waiting, so old "
        "low-priority work is never starved",
        "default": 0,
    },
    "strategy": {
        "enum": list(Strategy.values),
        "description": "which eligible worker takes an attempt: least_loaded (smallest share "
        "of its slots busy), round_robin (successive attempts to successive workers), "
        "random, pinned (only pinned_worker; never fails over) or broadcast (one shard per "
        "matching online worker at trigger time)",
        "default": Strategy.LEAST_LOADED.value,
        MESSAGES: {"enum": "Choose least_loaded, round_robin, random, pinned or broadcast."},
    },
    "pinned_worker": {
        "maxLength": 200,
        "description": "the name of the worker a pinned task runs on; empty otherwise",
        "default": "",
    },
    "enabled": {"description": "a disabled task cannot be run", "default": True},
    "schedule": {
        "maxLength": MAX_SCHEDULE_CHARS,
        "description": "five-field cron expression (minute hour day-of-month month "
        "day-of-week) or @hourly, @daily, @weekly, @monthly, @yearly; empty for none",
        "default": "",
    },
    "timezone": {
        "minLength": 1,
        "maxLength": 64,
        "description": "IANA time zone the schedule is read in (Europe/Berlin)",
        "default": "UTC",
    },
    "misfire_policy": {
        "enum": list(MisfirePolicy.values),
        "description": "a tick missed while the scheduler was down or paused: skip it, "
        "or run_once for the latest one (within the smaller of 24 h and one period)",
        "default": MisfirePolicy.SKIP.value,
    },
    "schedule_paused": {
        "description": "the schedule does not fire; the task can still be run",
        "default": False,
    },
    "shards": {
        "minimum": 1,
        "maximum": MAX_SHARDS,
        "description": "attempts per run, each with SCHEDULER_SHARD_INDEX (0..shards-1) "
        "and SCHEDULER_SHARD_COUNT, retried alone; the run succeeds when all do",
        "default": 1,
    },
    "merge_command": {
        "description": "run once all shards succeeded, like command (shell or argv), with "
        "the shards' stdout in shard order as stdin and SCHEDULER_SHARD_OUTPUTS naming a "
        "directory of one file per shard; its stdout is the run's result; empty for none",
        "default": "",
    },
}
TASK_FIELD_SCHEMAS = {
    name: {**_TASK_FIELD_RULES[name], "type": json_type(types)}
    for name, types in TASK_FIELDS.items()
}

SECRET_ENV = {
    **ENV,
    "description": f"write-only secret variables, NAME: value, at most {MAX_ENV}: never "
    "returned (see secret_env_keys), masked as *** in output, stored encrypted. The object "
    "is the whole set: a null value keeps that name's current value, names left out are "
    "removed; leave the field out to keep them all. A name cannot also be in env",
    "additionalProperties": {"type": ["string", "null"]},
    "writeOnly": True,
}
SECRET_ENV_KEYS = {
    "type": "array",
    "items": {"type": "string"},
    "description": "the names of the task's secret variables, sorted; their values are never shown",
}
SECRET_ENV_UNREADABLE = {
    "type": "boolean",
    "description": "the secret values were encrypted with another SECRET_KEY and cannot be "
    "read: its runs fail until a whole new secret_env is given",
}

# A task's own JSON sent back as it came (id and times included) is a valid
# body, to change it or to make a copy: those are read-only and ignored.
READ_ONLY = {
    "id": {"type": "integer", "readOnly": True},
    "next_runs": {"type": "array", "readOnly": True},
    "created_at": {**TIME, "readOnly": True},
    "updated_at": {**TIME, "readOnly": True},
    "secret_env_keys": {**SECRET_ENV_KEYS, "readOnly": True},
    "secret_env_unreadable": {**SECRET_ENV_UNREADABLE, "readOnly": True},
}
TASK_CREATE = Body(
    "TaskCreate",
    {
        "type": "object",
        "properties": {**READ_ONLY, **TASK_FIELD_SCHEMAS, "secret_env": SECRET_ENV},
        "required": ["name", "command"],
        "additionalProperties": False,
    },
    "A new task: name and command, and any other field (left out: its default). "
    "A task's own JSON may be sent, to copy it: id and times are ignored.",
)
TASK_UPDATE = Body(
    "TaskUpdate",
    {
        "type": "object",
        "properties": {**READ_ONLY, **TASK_FIELD_SCHEMAS, "secret_env": SECRET_ENV},
        "additionalProperties": False,
    },
    "Fields to change; fields left out keep their value.",
)

RUN_PARAMS_SCHEMA = {
    "type": "object",
    "description": "Run parameters: env laid over the task's environment, args appended "
    "to its command line (quoted with shlex); both optional.",
    "properties": {
        "env": {
            **ENV,
            MESSAGES: {**ENV[MESSAGES], "type": "Expected an object of NAME: value strings."},
        },
        "args": {
            "type": "array",
            "maxItems": MAX_ARGS,
            "items": {"type": "string", "maxLength": MAX_ARG_CHARS},
            "description": f"at most {MAX_ARGS} words, each up to {MAX_ARG_CHARS} "
            "characters, no NUL",
            MESSAGES: {
                "type": "Expected a list of strings.",
                "maxItems": f"At most {MAX_ARGS} arguments.",
            },
        },
    },
    "additionalProperties": False,
    MESSAGES: {"type": "Run parameters must be an object with env and/or args."},
}
RUN_AT = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 with a UTC offset: start no earlier than this (a delayed run); "
    f"not in the past, at most {MAX_DELAY_DAYS} days ahead",
    MESSAGES: {"type": "Give a time in ISO 8601 with a UTC offset."},
}
RUN_PARAMS = Body(
    "RunParameters",
    {
        **RUN_PARAMS_SCHEMA,
        "description": RUN_PARAMS_SCHEMA["description"] + " run_at delays the run.",
        "properties": {**RUN_PARAMS_SCHEMA["properties"], "run_at": RUN_AT},
    },
    "Optional; an empty body runs as it is, now.",
)
BULK_TRIGGER = Body(
    "BulkTrigger",
    {
        "type": "object",
        "properties": {
            "task": {"type": "integer", "description": "the task's id"},
            "count": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_RUNS_PER_REQUEST,
                "default": 1,
                "description": "that many runs without parameters",
                MESSAGES: {
                    "minimum": f"Give 1 to {MAX_RUNS_PER_REQUEST}.",
                    "maximum": f"Give 1 to {MAX_RUNS_PER_REQUEST}.",
                },
            },
            "runs": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_RUNS_PER_REQUEST,
                "items": RUN_PARAMS_SCHEMA,
                "description": "one run per set of parameters, in order",
                MESSAGES: {
                    "minItems": f"Give 1 to {MAX_RUNS_PER_REQUEST} runs.",
                    "maxItems": f"Give 1 to {MAX_RUNS_PER_REQUEST} runs.",
                },
            },
            "run_at": {**RUN_AT, "description": RUN_AT["description"] + "; for every run"},
        },
        "required": ["task"],
        "additionalProperties": False,
        "not": {"required": ["count", "runs"]},
        MESSAGES: {"not": "Give either count or runs, not both."},
    },
    f"Many runs of one task in one transaction: a count or a list of run parameters "
    f"(1 to {MAX_RUNS_PER_REQUEST}), optionally all delayed to run_at. Nothing is started "
    "if any entry is refused.",
)


def answer_object(properties: dict, description: str = "") -> dict:
    """An answer's object: every property always present."""
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {**schema, "description": description} if description else schema


FIRE_TIME = answer_object(
    {
        "at": {**TIME, "description": "in the task's time zone, with its offset"},
        "dst": {
            "enum": ["gap", "repeat", None],
            "description": "gap: the schedule names a time that does not exist that day; "
            "repeat: the time happens twice that day",
        },
        "note": {"type": "string", "description": "what happens then, for people"},
    },
    "One upcoming fire time of a schedule.",
)
TASK = answer_object(
    {
        "id": ID,
        **TASK_FIELD_SCHEMAS,
        "secret_env_keys": SECRET_ENV_KEYS,
        "secret_env_unreadable": SECRET_ENV_UNREADABLE,
        "created_at": TIME,
        "updated_at": TIME,
    },
    "A task: what to run and how.",
)
TASK_WITH_NEXT_RUNS = answer_object(
    {
        **TASK["properties"],
        "next_runs": {
            "type": "array",
            "items": FIRE_TIME,
            "description": "the next 5 fire times; empty when the task does not fire "
            "(no schedule, schedule paused, task disabled)",
        },
    },
    "A task, with its next fire times.",
)


def attempt_schema(*, with_output: bool) -> dict:
    nullable_int = {"type": ["integer", "null"]}
    properties = {
        "id": ID,
        "shard_index": {"type": "integer", "minimum": 0},
        "try_number": {"type": "integer", "minimum": 1},
        "worker": {"type": ["string", "null"], "description": "the worker's name"},
        "status": {"enum": list(Attempt.Status.values)},
        "exit_code": nullable_int,
        "reason": {"type": "string"},
        "queued_at": TIME,
        "not_before": {**NULLABLE_TIME, "description": "a retry's backoff"},
        "assigned_at": NULLABLE_TIME,
        "accepted_at": NULLABLE_TIME,
        "started_at": NULLABLE_TIME,
        "finished_at": NULLABLE_TIME,
        "output_bytes": {"type": "integer", "minimum": 0, "description": "what it printed"},
        "truncated": {"type": "boolean"},
        "superseded": {
            "type": "boolean",
            "description": "the master gave up on it and the agent's result came later",
        },
        "late_result": {
            "oneOf": [
                {"type": "null"},
                answer_object(
                    {
                        "status": {"type": ["string", "null"]},
                        "exit_code": nullable_int,
                        "reason": {"type": ["string", "null"]},
                        "reported_at": NULLABLE_TIME,
                    }
                ),
            ],
            "description": "the agent's own result of a superseded attempt, kept, never applied",
        },
    }
    if with_output:
        properties.update(
            output={
                "type": ["string", "null"],
                "description": "stdout and stderr interleaved in order; null for an attempt "
                "of a sharded run unless `shard` names its shard",
            },
            stdout={"type": ["string", "null"]},
            stderr={"type": ["string", "null"]},
        )
    return answer_object(properties, "One try of one shard on one worker.")


ATTEMPT = attempt_schema(with_output=False)
ATTEMPT_WITH_OUTPUT = attempt_schema(with_output=True)


SHARD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["index", "status", "worker", "attempts"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "status": {
            "enum": [*Attempt.Status.values, None],
            "description": "of its latest attempt; null: none yet (a merge not queued yet)",
        },
        "worker": {"type": ["string", "null"], "description": "of its latest attempt"},
        "attempts": {"type": "integer", "minimum": 0, "description": "tries so far"},
    },
}


def run_schema(*, with_output: bool) -> dict:
    output = (
        {
            "result": {
                "type": ["string", "null"],
                "description": "the merge command's stdout, or the shards' stdout in shard "
                f"order; its first {RESULT_INLINE_CHARS:,} characters (all of it: GET "
                "/api/runs/{id}/result); null until the run succeeded",
            },
            "result_truncated": {
                "type": "boolean",
                "description": "the result is longer than what `result` shows",
            },
        }
        if with_output
        else {}
    )
    return answer_object(
        {
            "id": ID,
            "task": {
                "type": ["integer", "null"],
                "description": "the task's id, kept after it is deleted",
            },
            "task_deleted": {"type": "boolean", "description": "the task has been deleted"},
            "task_name": {"type": "string"},
            "status": {"enum": list(Run.Status.values)},
            "reason": {"type": "string", "description": "why it failed"},
            "trigger": {"enum": list(Run.Trigger.values)},
            "retry_of": {"type": ["integer", "null"], "description": "the run this one retries"},
            "cancel_requested_at": NULLABLE_TIME,
            "cancel_requested_by": {
                "type": ["string", "null"],
                "description": "the user who asked to cancel it",
            },
            "command": {"type": "string", "description": "as it ran, with its args"},
            "params": {**RUN_PARAMS_SCHEMA, "description": "the run parameters it was given"},
            "scheduled_for": {
                **NULLABLE_TIME,
                "description": "the cron tick a scheduled run is for (trigger schedule)",
            },
            "run_at": {
                **NULLABLE_TIME,
                "description": "a delayed run: not started before this; null: at once",
            },
            "created_at": TIME,
            "started_at": NULLABLE_TIME,
            "finished_at": NULLABLE_TIME,
            "shards": {
                "type": "array",
                "items": SHARD,
                "description": "each shard (0..N-1) as its latest attempt says",
            },
            "merge": {
                "oneOf": [{"type": "null"}, SHARD],
                "description": "the merge (index N) as its latest attempt says; "
                "null without a merge command",
            },
            "attempts": {
                "type": "array",
                "items": ATTEMPT_WITH_OUTPUT if with_output else ATTEMPT,
            },
            **output,
        },
        "One triggering of a task, with a snapshot of the task as it was.",
    )


RUN = run_schema(with_output=False)
RUN_WITH_OUTPUT = run_schema(with_output=True)
SCHEDULER = answer_object(
    {
        "paused": {"type": "boolean"},
        "paused_at": NULLABLE_TIME,
        "paused_by": {"type": "string"},
        "runs_running": {"type": "integer", "minimum": 0},
        "runs_queued": {"type": "integer", "minimum": 0},
    }
)
ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "what went wrong, for people"},
        "errors": {
            "type": "object",
            "description": "messages per field, keyed by the path of the value: "
            "timeout, labels[1], runs[0].env.NAME; 'body' for the body as a whole",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
    "required": ["error"],
    "description": "Every error of the API, from 400 to 500.",
}


def page_of(schema: dict, description: str) -> dict:
    return answer_object(
        {
            "results": {"type": "array", "items": schema},
            "next": {
                "type": ["string", "null"],
                "format": "uri",
                "description": "the absolute URL of the next page; null on the last",
            },
        },
        description,
    )


def results_of(schema: dict) -> dict:
    return answer_object({"results": {"type": "array", "items": schema}})


LIMIT = query_param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": PAGE_LIMIT_DEFAULT},
    "page size",
)


def id_param(name: str, description: str) -> dict:
    return query_param(name, {"type": "integer", "minimum": 1, "maximum": MAX_ID}, description)


EVENT = answer_object(
    {
        "id": {"type": "integer", "minimum": 1, "description": "ids grow in commit order"},
        "at": TIME,
        "kind": {
            "type": "string",
            "description": "run.queued, attempt.assigned, attempt.finished, run.finished, ... "
            "(README, Events)",
        },
        "run_id": {"type": ["integer", "null"]},
        "attempt_id": {"type": ["integer", "null"]},
        "task_id": {"type": ["integer", "null"]},
        "worker_id": {"type": ["integer", "null"]},
        "data": {"type": "object", "description": "what the kind says more: a pid, an exit code"},
        "text": {"type": "string", "description": "the event in words, as the run page says it"},
    },
    "One state change, recorded in the same transaction as the change.",
)


AUDIT_ENTRY = answer_object(
    {
        "id": {"type": "integer", "minimum": 1},
        "actor": {
            "type": "string",
            "description": "a username; `name (token T)` for an API token; `manage.py`; "
            "for a failed login the name that was tried",
        },
        "action": {"type": "string", "description": "task.update, run.trigger, login, ..."},
        "target": {"type": "string", "description": "what it was done to: `task 12 (nightly)`"},
        "at": TIME,
        "address": {"type": "string", "description": "the client's IP address"},
        "changes": {
            "type": "object",
            "description": "an edit's {field: [old, new]}; ids and facts for other actions; "
            "never a secret's value",
        },
    },
    "One entry of the audit log; entries are never edited.",
)
