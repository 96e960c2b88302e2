"""Validation shared by the task form, the JSON API and worker registration."""

import re
import shlex

from django.core.exceptions import ValidationError

LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_LABELS = 32
MAX_ENV = 100


def clean_labels(value) -> list[str]:
    """A list of labels from a list or a comma-separated string, deduplicated in order."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValidationError("Labels must be a list of strings or a comma-separated string.")
    labels: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValidationError("Each label must be a string.")
        if item == "":
            continue
        if not LABEL_RE.match(item):
            raise ValidationError(
                f"Invalid label {item!r}: use 1-64 letters, digits, '.', '_' or '-'."
            )
        if item not in labels:
            labels.append(item)
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"At most {MAX_LABELS} labels.")
    return labels


def clean_env(value) -> dict[str, str]:
    """Environment variables from an object or from KEY=VALUE lines."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = {}
        for number, line in enumerate(value.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "=" not in line:
                raise ValidationError(f"Line {number}: expected KEY=VALUE, got {line.strip()!r}.")
            key, _, val = line.partition("=")
            pairs[key.strip()] = val
        value = pairs
    if not isinstance(value, dict):
        raise ValidationError("Environment must be an object of string values.")
    if len(value) > MAX_ENV:
        raise ValidationError(f"At most {MAX_ENV} environment variables.")
    env: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise ValidationError(
                f"Invalid variable name {key!r}: "
                "use letters, digits and '_', not starting with a digit."
            )
        if not isinstance(val, str):
            raise ValidationError(f"The value of {key} must be a string.")
        if "\x00" in val:
            raise ValidationError(f"The value of {key} contains a NUL byte.")
        env[key] = val
    return env


def check_command(command: str, shell: bool) -> None:
    if "\x00" in command:
        raise ValidationError("The command contains a NUL byte.")
    if shell:
        return
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValidationError(f"Cannot split the command into arguments: {exc}.") from None
    if not argv:
        raise ValidationError("The command is empty.")
