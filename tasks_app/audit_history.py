"""Reading the audit log: filtered, newest first, keyset-paginated.

The same shape as tasks_app.history: every query parameter parsed strictly
(InvalidFilter names the bad one), WHERE id < last seen instead of OFFSET.
The dashboard's audit page and GET /api/audit share it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from django.db.models import Q

from tasks_app.history import InvalidFilter, parse_id, parse_moment
from tasks_app.models import AuditEntry

MAX_TEXT_FILTER = 200
# An action (task.update: that one) or a kind of target (task: every task.* action).
ACTION_RE = re.compile(r"[a-z_]{1,30}(\.[a-z_]{1,30})?")
FILTERS = ("actor", "action", "target", "since", "until", "before")


@dataclass
class Page:
    entries: list[AuditEntry]
    next_before: int | None


def parse_filters(params) -> dict:
    """actor, action, target, since, until and before from a query dict,
    checked; raises InvalidFilter. Dates are ISO 8601: a day (until: through
    its end) or a time with an offset."""
    filters: dict = {}
    for name in ("actor", "target"):
        value = (params.get(name) or "").strip()
        if len(value) > MAX_TEXT_FILTER:
            raise InvalidFilter(f"{name} must be at most {MAX_TEXT_FILTER} characters")
        if value:
            filters[name] = value
    action = params.get("action") or ""
    if action:
        if not ACTION_RE.fullmatch(action):
            raise InvalidFilter(
                f"action must be an action (task.update) or a kind (task), not {action[:40]!r}"
            )
        filters["action"] = action
    for name in ("since", "until"):
        raw = params.get(name) or ""
        if raw:
            filters[name] = parse_moment(name, raw)
    raw = params.get("before") or ""
    if raw:
        filters["before"] = parse_id("before", raw)
    return filters


def entries_page(
    *,
    actor: str = "",
    action: str = "",
    target: str = "",
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    before: int | None = None,
    limit: int = 50,
) -> Page:
    """Entries newest first (by id: ids grow with time), at most `limit`."""
    rows = AuditEntry.objects.all()
    if actor:
        rows = rows.filter(actor__icontains=actor)
    if action:
        if "." in action:
            rows = rows.filter(action=action)
        else:
            rows = rows.filter(Q(action=action) | Q(action__startswith=f"{action}."))
    if target:
        rows = rows.filter(target__icontains=target)
    if since:
        rows = rows.filter(at__gte=since)
    if until:
        rows = rows.filter(at__lt=until)
    if before:
        rows = rows.filter(pk__lt=before)
    found = list(rows.order_by("-id")[: limit + 1])
    more = len(found) > limit
    found = found[:limit]
    return Page(entries=found, next_before=found[-1].pk if more and found else None)


def query_string_values(filters: dict) -> dict:
    """Filters as query parameters again (times in ISO 8601), for links."""
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in filters.items()}
