"""Validation shared by the task form, the JSON API and worker registration."""

import datetime as dt
import json
import re
import shlex

from django.core.exceptions import ValidationError

from scheduler_site.wire import LABEL_PATTERN, MAX_FRAME_BYTES, MAX_LABELS

LABEL_RE = re.compile(LABEL_PATTERN)
# Ids are 64-bit database integers: a bigger one is nobody's, and would overflow.
MAX_ID = 2**63 - 1
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
        if not LABEL_RE.fullmatch(item):
            raise ValidationError(
                f"Invalid label {item!r}: use 1-64 letters, digits, '.', '_' or '-'."
            )
        if item not in labels:
            labels.append(item)
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"At most {MAX_LABELS} labels.")
    return labels


def clean_env(value, *, secret: bool = False) -> dict[str, str]:
    """Environment variables from an object or from KEY=VALUE lines.

    Every problem is reported, not just the first: a form with three bad
    lines says so once, in one list of messages (the API's `errors.env`).
    `secret`: a bad line is named by its number alone, never quoted (it may be
    a value: a pasted key's second line).
    """
    if value is None or value == "":
        return {}
    errors: list[str] = []
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        seen_on: dict[str, int] = {}
        for number, line in enumerate(value.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "=" not in line:
                got = "" if secret else f", got {line.strip()!r}"
                errors.append(f"Line {number}: expected KEY=VALUE{got}.")
                continue
            key, _, val = line.partition("=")
            key = key.strip()
            problems = _env_item_errors(key, val)
            if key in seen_on:
                problems.append(f"{key} is already set on line {seen_on[key]}.")
            errors.extend(f"Line {number}: {problem}" for problem in problems)
            if not problems:
                seen_on[key] = number
                pairs[key] = val
        if not errors and len(pairs) > MAX_ENV:
            errors.append(f"At most {MAX_ENV} environment variables.")
        if errors:
            raise ValidationError(errors)
        return pairs
    if not isinstance(value, dict):
        raise ValidationError("Environment must be an object of string values.")
    if len(value) > MAX_ENV:
        raise ValidationError(f"At most {MAX_ENV} environment variables.")
    for key, val in value.items():
        errors.extend(_env_item_errors(key, val))
    if errors:
        raise ValidationError(errors)
    return dict(value)


def clean_secret_env(value) -> dict[str, str | None]:
    """Secret variables from an object (the API: a null value keeps that name's
    current value) or from KEY=VALUE lines (the form's new ones)."""
    if isinstance(value, dict):
        if len(value) > MAX_ENV:
            raise ValidationError(f"At most {MAX_ENV} environment variables.")
        errors = []
        for key, val in value.items():
            # The value is never repeated in a message: only its name.
            errors.extend(_env_item_errors(key, "" if val is None else val))
        if errors:
            raise ValidationError(errors)
        return dict(value)
    return clean_env(value, secret=True)


def _env_item_errors(key, val) -> list[str]:
    """What is wrong with one variable: its name, then its value."""
    if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
        return [
            f"Invalid variable name {key!r}: "
            "use letters, digits and '_', not starting with a digit."
        ]
    if not isinstance(val, str):
        return [f"The value of {key} must be a string."]
    if "\x00" in val:
        return [f"The value of {key} contains a NUL byte."]
    return []


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


MAX_ARGS = 100
MAX_ARG_CHARS = 4096


def clean_run_params(value) -> dict:
    """Parameters of one run: {"env": {NAME: value}, "args": [word, ...]}, both optional.

    `env` is laid over the task's environment, `args` are appended to its
    command line (quoted, so a word stays one word even in a shell command).
    Raises ValidationError with a dict of messages per field.
    """
    if not isinstance(value, dict):
        raise ValidationError("Run parameters must be an object with env and/or args.")
    unknown = sorted(set(value) - {"env", "args"})
    if unknown:
        raise ValidationError(dict.fromkeys(unknown, "Unknown field."))
    params: dict = {}
    errors: dict[str, str | list[str]] = {}
    if "env" in value:
        if not isinstance(value["env"], dict):
            errors["env"] = "Expected an object of NAME: value strings."
        elif value["env"]:
            try:
                params["env"] = clean_env(value["env"])
            except ValidationError as exc:
                errors["env"] = exc.messages
    args = value.get("args")
    if "args" in value:
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            errors["args"] = "Expected a list of strings."
        elif len(args) > MAX_ARGS:
            errors["args"] = f"At most {MAX_ARGS} arguments."
        elif any("\x00" in a or len(a) > MAX_ARG_CHARS for a in args):
            errors["args"] = f"An argument contains a NUL byte or is over {MAX_ARG_CHARS} chars."
        elif args:
            params["args"] = list(args)
    if errors:
        raise ValidationError(errors)
    return params


# A run's command line, arguments and environment travel to its agent in one
# websocket message of at most MAX_FRAME_BYTES: half of it, with room to spare
# for the rest of the frame and for JSON escapes.
MAX_RUN_BYTES = MAX_FRAME_BYTES // 2


def check_run_size(definition: dict) -> None:
    """ValidationError when what an agent is sent for this run would not fit."""
    # secret_env: its token, a third bigger than the values it carries.
    keys = ["command", "argv", "env", "secret_env", "working_dir"]
    if definition.get("merge_command"):
        # Counted as if one frame carried both (a merge's carries less).
        keys += ["merge_command", "merge_argv"]
    what = {key: definition.get(key) for key in keys}
    size = len(json.dumps(what, ensure_ascii=False).encode())
    if size > MAX_RUN_BYTES:
        raise ValidationError(
            f"The command, its arguments and environment come to {size:,} bytes; "
            f"at most {MAX_RUN_BYTES:,} (they go to the agent in one message)."
        )


# How far ahead a delayed run may be set: further is more likely a typo (a
# year) than a plan, and a schedule is the tool for that.
MAX_DELAY_DAYS = 366


def clean_run_at(value, now: dt.datetime) -> dt.datetime:
    """A delayed run's start: ISO 8601 with a UTC offset, not in the past, at most
    MAX_DELAY_DAYS ahead. An aware datetime (the form's) is taken as it is."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError(
                f"Not a time in ISO 8601: {value!r} (e.g. 2030-01-31T09:30:00+01:00)."
            ) from None
    if not isinstance(value, dt.datetime):
        raise ValidationError("Give a time in ISO 8601 with a UTC offset.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError("Give the time with its UTC offset (e.g. +01:00 or Z).")
    if value < now:
        raise ValidationError(f"{value.isoformat()} is in the past (it is {now.isoformat()}).")
    if value > now + dt.timedelta(days=MAX_DELAY_DAYS):
        raise ValidationError(f"At most {MAX_DELAY_DAYS} days ahead.")
    return value


# --- notifications (tasks_app.notify) -------------------------------------------

# What a task can be told of: a run that failed, the first success after a
# failed run, and (only if asked) every success.
NOTIFY_EVENTS = ("failure", "recovery", "success")
MAX_WEBHOOKS = 20
MAX_NOTIFY_EMAILS = 20
MAX_URL_CHARS = 500
MAX_WEBHOOK_SECRET_CHARS = 500


def _clean_events(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"{where}: events must be a list of {', '.join(NOTIFY_EVENTS)}.")
    unknown = [item for item in value if item not in NOTIFY_EVENTS]
    if unknown:
        raise ValidationError(
            f"{where}: unknown event {unknown[0]!r}; choose from {', '.join(NOTIFY_EVENTS)}."
        )
    if not value:
        raise ValidationError(f"{where}: give at least one event ({', '.join(NOTIFY_EVENTS)}).")
    return [event for event in NOTIFY_EVENTS if event in value]


def clean_webhook_url(url, where: str) -> str:
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.strip():
        raise ValidationError(f"{where}: url is required.")
    url = url.strip()
    if len(url) > MAX_URL_CHARS or any(ch.isspace() for ch in url):
        raise ValidationError(f"{where}: url must be at most {MAX_URL_CHARS} chars, no spaces.")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise ValidationError(f"{where}: url must be an http:// or https:// URL, not {url!r}.")
    return url


def clean_webhooks(value, current: list[dict]) -> list[dict]:
    """A task's webhooks from a list of {"url", "secret", "events"} (the API)
    or lines of "URL EVENTS [SECRET]" (the form): [{"url", "events", "secret"}]
    with the secret in clear, to be encrypted by the caller.

    A webhook given without a secret (null, left out, or a line without one)
    keeps the secret of the current webhook with the same URL; a new URL must
    bring one. `has_secret` (from a task's own JSON sent back) is ignored.
    """
    from tasks_app import secret_env
    from tasks_app.exceptions import SecretsUnreadable

    entries = _entries(
        value,
        "webhooks",
        "URL EVENTS [SECRET], e.g. https://hooks.example.com/x failure,recovery s3cret",
        ("url", "events", "secret"),
        "{url, secret, events}",
        optional_last=True,
    )
    items = [item for _, item in entries]
    where_of = [where for where, _ in entries]
    if len(items) > MAX_WEBHOOKS:
        raise ValidationError(f"At most {MAX_WEBHOOKS} webhooks.")
    stored = {hook["url"]: hook.get("secret", "") for hook in current or ()}
    cleaned: list[dict] = []
    for item, where in zip(items, where_of, strict=True):
        if not isinstance(item, dict):
            raise ValidationError(f"{where}: expected an object with url, secret and events.")
        unknown = sorted(set(item) - {"url", "secret", "events", "has_secret"})
        if unknown:
            raise ValidationError(f"{where}: unknown field {unknown[0]!r}.")
        url = clean_webhook_url(item.get("url"), where)
        if url in {hook["url"] for hook in cleaned}:
            raise ValidationError(f"{where}: the url {url} is given twice.")
        events = _clean_events(item.get("events"), where)
        secret = item.get("secret")
        if secret is None:
            if not stored.get(url):
                raise ValidationError(
                    f"{where}: secret is required for a new webhook (it signs each body)."
                )
            try:
                secret = secret_env.decrypt(stored[url])["secret"]
            except SecretsUnreadable:
                raise ValidationError(
                    f"{where}: its stored secret cannot be read (another SECRET_KEY): "
                    "give it again."
                ) from None
        elif not isinstance(secret, str) or not secret or len(secret) > MAX_WEBHOOK_SECRET_CHARS:
            raise ValidationError(
                f"{where}: secret must be a string of 1 to {MAX_WEBHOOK_SECRET_CHARS} chars."
            )
        elif "\x00" in secret:
            raise ValidationError(f"{where}: secret contains a NUL byte.")
        cleaned.append({"url": url, "events": events, "secret": secret})
    return cleaned


def _entries(
    value, name: str, example: str, keys: tuple[str, ...], shape: str, optional_last=False
) -> list[tuple[str, object]]:
    """(where, item) of a task's notification targets: the API's list of
    objects, or the form's lines of words (blank lines and # comments skipped),
    each named by where it is ("webhooks[2]", "Line 3") for its errors."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [(f"{name}[{index}]", item) for index, item in enumerate(value)]
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a list of {shape} objects.")
    widths = {len(keys) - 1, len(keys)} if optional_last else {len(keys)}
    entries = []
    for number, line in enumerate(value.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) not in widths:
            raise ValidationError(f"Line {number}: expected {example}.")
        entries.append((f"Line {number}", dict(zip(keys, words, strict=False))))
    return entries


def clean_notify_emails(value) -> list[dict]:
    """A task's e-mail subscriptions from a list of {"address", "events"} (the
    API) or lines of "ADDRESS EVENTS" (the form)."""
    from django.core.validators import validate_email

    entries = _entries(
        value,
        "notify_emails",
        "ADDRESS EVENTS, e.g. ops@example.com failure,recovery",
        ("address", "events"),
        "{address, events}",
    )
    items = [item for _, item in entries]
    where_of = [where for where, _ in entries]
    if len(items) > MAX_NOTIFY_EMAILS:
        raise ValidationError(f"At most {MAX_NOTIFY_EMAILS} addresses.")
    cleaned: list[dict] = []
    for item, where in zip(items, where_of, strict=True):
        if not isinstance(item, dict):
            raise ValidationError(f"{where}: expected an object with address and events.")
        unknown = sorted(set(item) - {"address", "events"})
        if unknown:
            raise ValidationError(f"{where}: unknown field {unknown[0]!r}.")
        address = item.get("address")
        try:
            if not isinstance(address, str) or len(address) > 254:
                raise ValidationError("")
            address = address.strip()
            validate_email(address)
        except ValidationError:
            raise ValidationError(
                f"{where}: address {address!r} is not an e-mail address."
            ) from None
        if address in {entry["address"] for entry in cleaned}:
            raise ValidationError(f"{where}: the address {address} is given twice.")
        cleaned.append({"address": address, "events": _clean_events(item.get("events"), where)})
    return cleaned
