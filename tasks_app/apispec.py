"""How the JSON API declares itself: request bodies as JSON Schemas, operations.

Every request body the API takes is a `Body`: a JSON Schema (draft 2020-12,
the dialect of OpenAPI 3.1) compiled once, at import, into the validator
that checks requests. Every operation is an `Operation` given to `api_view`
beside its view. The published document (scheduler_site.openapi) is built
from these same objects, so what the API checks and what it documents
cannot drift apart.

The schemas check shape: types, required and unknown fields, ranges and
patterns. What needs the database or parsing (a unique name, a command that
shlex can split) is left to the forms and domain code after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator, validators

# JSON has one kind of number; this API takes integers without a fraction
# (2, not 2.0) where it counts things, as it did before it had schemas.
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
)
_Validator = validators.extend(Draft202012Validator, type_checker=_TYPES)

# Errors in words a JSON caller knows (not Python's dict and list).
TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "a list",
    "null": "null",
}

# Messages for people, per keyword, as an extension keyword of the schema
# whose constraint they explain: {"pattern": "Invalid label {value!r}: ..."},
# where {value!r} is the offending value (an object's key, for propertyNames).
# OpenAPI 3.1 allows x- keywords in a schema.
MESSAGES = "x-messages"


class Body:
    """A request body's JSON Schema, with its validator compiled once."""

    def __init__(self, name: str, schema: dict, description: str = "") -> None:
        self.name = name  # its name under components/schemas
        self.schema = {"title": name, **schema}
        self.description = description
        _Validator.check_schema(self.schema)
        self._validator = _Validator(self.schema)

    def errors(self, payload: Any) -> dict[str, list[str]]:
        """Field errors of this payload ({} when it is valid), keyed by the path
        of the value: `timeout`, `labels[1]`, `runs[0].env`."""
        errors: dict[str, list[str]] = {}
        for error in self._validator.iter_errors(payload):
            for path, message in _explain(error):
                messages = errors.setdefault(path or "body", [])
                if message not in messages:
                    messages.append(message)
        return dict(sorted(errors.items()))


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _explain(error) -> list[tuple[str, str]]:
    """(path, message) pairs for one jsonschema error, in the API's words."""
    path, schema, value = list(error.absolute_path), error.schema, error.instance
    keyword, expected = error.validator, error.validator_value
    if keyword == "additionalProperties" and expected is False:
        known = set(schema.get("properties", {}))
        return [(_path([*path, name]), "Unknown field.") for name in value if name not in known]
    if keyword == "required":
        missing = [name for name in expected if name not in value]
        return [(_path([*path, name]), "This field is required.") for name in missing]
    if keyword in schema.get(MESSAGES, {}):
        return [(_path(path), schema[MESSAGES][keyword].format(value=value))]
    if keyword == "type":
        kinds = [expected] if isinstance(expected, str) else expected
        return [(_path(path), f"Expected {' or '.join(TYPE_WORDS[k] for k in kinds)}.")]
    return [(_path(path), _MESSAGES.get(keyword, _default)(expected, error))]


def _default(expected, error) -> str:
    return error.message


def _min_length(expected, error) -> str:
    if expected == 1:
        return "This field is required."
    return f"Ensure this value has at least {expected} characters."


# keyword -> message, in Django's words where Django has them.
_MESSAGES = {
    "minimum": lambda n, _: f"Ensure this value is greater than or equal to {n}.",
    "maximum": lambda n, _: f"Ensure this value is less than or equal to {n}.",
    "minLength": _min_length,
    "maxLength": lambda n, _: f"Ensure this value has at most {n} characters.",
    "minItems": lambda n, _: f"Give at least {n}.",
    "maxItems": lambda n, _: f"Give at most {n}.",
    "maxProperties": lambda n, _: f"At most {n} entries.",
    "enum": lambda values, _: f"Use one of {', '.join(map(str, values))}.",
}


@dataclass(frozen=True)
class Operation:
    """One method of one API path, as the view serves it and the document shows it.

    responses: status -> schema of the JSON answered (None: no body), for the
    successful answers; errors: the error statuses this operation can answer
    beyond those every authenticated one can (401, 403) or that any
    operation with a body or query can (400).
    """

    summary: str
    responses: dict[int, dict | None]
    description: str = ""
    body: Body | None = None
    body_optional: bool = False
    query: tuple[dict, ...] = ()
    path_params: dict[str, dict] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    # The role it needs (tasks_app.roles); every operation that is not public names one.
    role: str = ""
    # No credentials at all (worker enrollment is gated by a token in its body).
    public: bool = False
    # The trigger endpoints: their body and credentials are read by
    # tasks_app.trigger_api, shared with the ASGI consumers that serve them.
    served_by_trigger_api: bool = False
    content_type: str = "application/json"

    def __post_init__(self) -> None:
        from tasks_app.roles import ROLES

        if self.public == bool(self.role) or (self.role and self.role not in ROLES):
            raise ValueError(f"{self.summary!r}: give a role of {ROLES}, or public=True")


def query_param(name: str, schema: dict, description: str) -> dict:
    """An OpenAPI parameter object for the query string."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }
