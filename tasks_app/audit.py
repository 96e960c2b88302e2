"""The audit log: who changed what, when and from where.

Every change people make (tasks, runs, workers, the scheduler switch, API
tokens, users) and every login, failed login and logout leaves one
`AuditEntry`. The place that knows the request records it, with one call:

    audit.record(request, "worker.approve", worker, {"state": ["pending", "online"]})

`record` takes the actor from the request (its user, and the API token
`jsonapi.authenticate` stashed as `request.api_token`) and the address the
same way the login rate limit does (scheduler_site.clientip). Call it in the
transaction of the change, so that both or neither are kept. Management
commands, which have no request, call `record_as("manage.py", ...)`. Hot
paths that serve many requests in one batch (the trigger endpoints) build
entries with `entry()` and `bulk_create` them, one INSERT per batch.

Actions are "<thing>.<verb>": task.create, task.update, task.delete,
task.schedule_pause, task.schedule_resume, run.trigger, run.cancel,
run.retry, run.cancel_many, run.retry_many (the runs list's bulk actions: one
entry listing the runs), worker.drain, worker.resume, worker.disable, worker.enable,
worker.revoke, worker.enroll, enrollment_token.create, scheduler.pause,
scheduler.resume, token.create, token.revoke, user.create, user.update,
user.delete, group.* (Django admin), login, login.failed, logout. One
request is one action and leaves one entry: a bulk trigger lists its run ids
in `changes`. A new action (worker.approve, enrollment_token.revoke) is a new
line in ACTIONS, which the audit page offers in its filter, and a call:

    with transaction.atomic():
        ...  # the change
        audit.record(request, "enrollment_token.revoke", token)

`changes` says what changed: {field: [old, new]} for an edit (`diff`), ids
and facts otherwise. Secret values never go in: a task's write-only
secret_env is recorded by the names added, changed or removed.

Entries are never edited (AuditEntry refuses it). The application never
deletes them either; retention, if wanted, is a DELETE in SQL by the
operator (README, "Audit log").
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import user_logged_in, user_logged_out, user_login_failed
from django.http import HttpRequest

from scheduler_site.clientip import client_ip
from tasks_app.exceptions import SecretsUnreadable
from tasks_app.models import TASK_FIELDS, AuditEntry

# What a target is called in `target`, by model (app_label.model_name).
KINDS = {
    "tasks_app.task": "task",
    "tasks_app.run": "run",
    "tasks_app.apitoken": "token",
    "tasks_app.schedulerstate": "scheduler",
    "workers_app.worker": "worker",
    "workers_app.enrollmenttoken": "enrollment token",
    "auth.user": "user",
    "auth.group": "group",
}
# Every action recorded outside Django admin (which adds <kind>.create, .update
# and .delete for any model): the audit page offers these in its filter.
ACTIONS = (
    "task.create",
    "task.update",
    "task.delete",
    "task.schedule_pause",
    "task.schedule_resume",
    "run.trigger",
    "run.cancel",
    "run.retry",
    "run.cancel_many",
    "run.retry_many",
    "worker.enroll",
    "worker.drain",
    "worker.resume",
    "worker.disable",
    "worker.enable",
    "worker.revoke",
    "worker.approve",
    "worker.allow_reenroll",
    "enrollment_token.create",
    "enrollment_token.revoke",
    "scheduler.pause",
    "scheduler.resume",
    "token.create",
    "token.revoke",
    "user.create",
    "user.update",
    "user.delete",
    "login",
    "login.failed",
    "logout",
)
SCHEDULER = ("scheduler", "", "scheduler")
MAX_TEXT = 300


def record(
    request: HttpRequest | None,
    action: str,
    target: Any = None,
    changes: dict | None = None,
    *,
    actor: str | None = None,
) -> AuditEntry:
    """Record one action of this request on `target` (a model instance, a
    (type, id, text) triple, a text or None). `actor` overrides who, for a
    caller that is not a user (an agent enrolling with a token)."""
    made = entry(*actor_of(request), address_of(request), action, target, changes)
    if actor is not None:
        made.actor = actor[:MAX_TEXT]
    made.save()
    return made


def record_as(
    actor: str, action: str, target: Any = None, changes: dict | None = None, *, user=None
) -> AuditEntry:
    """Record an action without a request: a management command ("manage.py")
    or the system itself."""
    made = entry(actor, getattr(user, "pk", None), None, "", action, target, changes)
    made.save()
    return made


def entry(
    actor: str,
    user_id: int | None,
    token_id: int | None,
    address: str,
    action: str,
    target: Any = None,
    changes: dict | None = None,
) -> AuditEntry:
    """An unsaved entry, for callers that save many at once (bulk_create)."""
    target_type, target_id, text = describe(target)
    return AuditEntry(
        actor=actor[:MAX_TEXT],
        actor_user_id=user_id,
        token_id=token_id,
        address=address[:64],
        action=action,
        target=text[:MAX_TEXT],
        target_type=target_type,
        target_id=str(target_id)[:64],
        changes=changes or {},
    )


def actor_of(request: HttpRequest | None) -> tuple[str, int | None, int | None]:
    """(actor text, user id, token id) of a request."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return "anonymous", None, None
    token = getattr(request, "api_token", None)
    if token is None:
        return user.get_username(), user.pk, None
    return token_actor(user.get_username(), token.id, token.name), user.pk, token.id


def token_actor(username: str, token_id: int, token_name: str) -> str:
    return f"{username} (token {token_name or f'#{token_id}'})"


def address_of(request: HttpRequest | None) -> str:
    return client_ip(request) if request is not None else ""


def describe(target: Any) -> tuple[str, str, str]:
    """(type, id, text) of a target: `task 12 (nightly)`."""
    if target is None:
        return "", "", ""
    if isinstance(target, tuple):
        kind, pk, text = target
        return kind, str(pk), text
    if isinstance(target, str):
        return "", "", target
    meta = target._meta
    kind = KINDS.get(f"{meta.app_label}.{meta.model_name}", meta.model_name)
    if kind == "scheduler":
        return SCHEDULER
    return kind, str(target.pk), f"{kind} {target.pk} ({_name(target)})"


def _name(target) -> str:
    for attribute in ("task_name", "name", "username", "note"):
        value = getattr(target, attribute, None)
        if isinstance(value, str) and value:
            return value
    return str(target)


# --- what changed -------------------------------------------------------------

# The value of a secret variable this server cannot decrypt: equal to itself
# only, so a new value for it is a change and keeping the token is not.
UNREADABLE = object()


def task_state(task) -> dict:
    """A task's fields as people set them, to diff before and after an edit.
    Secret values are held only in memory, for `diff`, which keeps their names."""
    state = {name: getattr(task, name) for name in TASK_FIELDS if name != "secret_env"}
    state["secret_env"] = {}
    # Notifications: URLs, addresses and events; a webhook's secret never.
    state["webhooks"] = task.webhooks_shown()
    state["notify_emails"] = list(task.notify_emails or ())
    if task.pk and task.secret_env:
        try:
            state["secret_env"] = task.secret_values()
        except SecretsUnreadable:
            # Encrypted under another SECRET_KEY: the names are known, the values
            # are not; any value set for one of them counts as a change.
            state["secret_env"] = dict.fromkeys(task.secret_env_keys, UNREADABLE)
    return state


def diff(before: dict, after: dict) -> dict:
    """{field: [old, new]} of the fields that differ; for secret_env the names
    added, changed and removed, never a value."""
    changes: dict[str, Any] = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name == "secret_env":
            changes[name] = _secret_names(old or {}, new or {})
        else:
            changes[name] = [old, new]
    return changes


def _secret_names(old: dict, new: dict) -> dict[str, list[str]]:
    named = {
        "added": sorted(set(new) - set(old)),
        "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
        "removed": sorted(set(old) - set(new)),
    }
    return {key: names for key, names in named.items() if names}


def token_changes(token) -> dict:
    """What a new API token is: its owner, name and expiry (never its value)."""
    expires = token.expires_at.isoformat() if token.expires_at else None
    return {"user": token.user.get_username(), "name": token.name, "expires_at": expires}


def created(after: dict) -> dict:
    """A new object's fields, as an edit from nothing: {field: [None, value]}."""
    return diff(dict.fromkeys(after), after)


# --- logins --------------------------------------------------------------------


def connect_login_receivers() -> None:
    # django-axes listens to the same signals, for its rate limit; these only record.
    user_logged_in.connect(_logged_in, dispatch_uid="audit_login")
    user_logged_out.connect(_logged_out, dispatch_uid="audit_logout")
    user_login_failed.connect(_login_failed, dispatch_uid="audit_login_failed")


def _logged_in(sender, request, user, **kwargs) -> None:
    entry(user.get_username(), user.pk, None, address_of(request), "login", user).save()


def _logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:  # logging out without a session changes nothing
        entry(user.get_username(), user.pk, None, address_of(request), "logout", user).save()


def _login_failed(sender, credentials, request=None, **kwargs) -> None:
    # No user: the name that was tried, as given (it may not exist).
    tried = str(credentials.get("username", ""))[:150]
    target = ("user", "", f"user {tried}")
    entry(tried or "anonymous", None, None, address_of(request), "login.failed", target).save()
