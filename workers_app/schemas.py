"""The JSON shapes of workers: enrollment (checked) and a worker (documented)."""

from __future__ import annotations

from tasks_app.apispec import MESSAGES, Body
from tasks_app.schemas import LABELS, NULLABLE_TIME, answer_object
from workers_app.models import Worker

NAME_PATTERN = r"^[A-Za-z0-9_.@-]*$"
NAME_MESSAGE = "Use 1-200 letters, digits, '.', '_', '@' or '-'."
MAX_CAPACITY = 1024

REGISTRATION = Body(
    "WorkerRegistration",
    {
        "type": "object",
        "properties": {
            "token": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "an enrollment token (manage.py enrollmenttoken, or the "
                "dashboard's Add worker)",
            },
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": NAME_PATTERN,
                "description": "unique among workers",
                MESSAGES: {"pattern": NAME_MESSAGE, "maxLength": NAME_MESSAGE},
            },
            "hostname": {"type": "string", "maxLength": 255, "default": ""},
            "capacity": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_CAPACITY,
                "description": "slots: attempts it runs at once",
            },
            "labels": {
                **LABELS,
                "default": [],
                MESSAGES: {"type": "Expected a list of strings."},
            },
        },
        "required": ["token", "name", "capacity"],
        "additionalProperties": False,
    },
    "What an agent sends once to become a worker; its answer holds the worker's credential.",
)

WORKER = answer_object(
    {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string"},
        "hostname": {"type": "string"},
        "state": {"enum": list(Worker.State.values)},
        "labels": {"type": "array", "items": {"type": "string"}},
        "capacity": {"type": "integer", "minimum": 1},
        "slots_in_use": {"type": "integer", "minimum": 0},
        "last_heartbeat": NULLABLE_TIME,
        "agent_version": {"type": "string"},
        "revoked": {"type": "boolean"},
        "requested_labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "what its agent asks for; `labels` is what an admin decided",
        },
        "requested_capacity": {
            "type": ["integer", "null"],
            "description": "what its agent asks for; it gets the lesser of this and `capacity`",
        },
        "approved_at": {
            **NULLABLE_TIME,
            "description": "null while `state` is pending: it gets no work until approved",
        },
    },
    "A node's agent and its slots.",
)
APPROVAL = Body(
    "WorkerApproval",
    {
        "type": "object",
        "properties": {
            "labels": {
                **LABELS,
                "description": "the labels it may take work for (default: what it asked for)",
                MESSAGES: {"type": "Expected a list of strings."},
            },
            "capacity": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_CAPACITY,
                "description": "its slots at most (default: what it asked for)",
            },
        },
        "additionalProperties": False,
    },
    "An admin's decision on a pending worker.",
)
ENROLLED = answer_object(
    {
        "worker": WORKER,
        "credential": {
            "type": "string",
            "description": "the worker's secret, shown once: the agent sends it to connect",
        },
    }
)
