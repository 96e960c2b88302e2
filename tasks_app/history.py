"""Reading run history: filtered, newest first, keyset-paginated.

Keyset (WHERE id < last seen) instead of OFFSET, so page 1,000 costs what
page 1 costs; the (status, -id) and (task, -id) indexes serve the filters.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch

from tasks_app.models import Attempt, Run

MAX_ID = 2**63 - 1


class InvalidFilter(ValueError):
    """A filter value in the query string is not usable."""


@dataclass
class Page:
    runs: list[Run]
    next_before: int | None


def parse_filters(params) -> dict:
    """status, task and before from a query dict, checked; raises InvalidFilter."""
    filters: dict = {}
    status = params.get("status") or ""
    if status:
        if status not in Run.Status.values:
            raise InvalidFilter(
                f"unknown status {status!r}; use one of {', '.join(Run.Status.values)}"
            )
        filters["status"] = status
    for name in ("task", "before"):
        raw = params.get(name) or ""
        if raw:
            # isascii(): str.isdigit() accepts "²", which int() rejects (a 500, not a
            # 400); the length and upper bound keep it inside a 64-bit database integer
            # (and under int()'s 4,300-digit limit).
            digits = raw.isascii() and raw.isdigit() and len(raw) <= 19
            if not digits or not 1 <= int(raw) <= MAX_ID:
                raise InvalidFilter(f"{name} must be a positive whole number, not {raw!r}")
            filters[name] = int(raw)
    return filters


def runs_page(
    *, status: str = "", task: int | None = None, before: int | None = None, limit: int = 50
) -> Page:
    runs = Run.objects.all()
    if status:
        runs = runs.filter(status=status)
    if task:
        runs = runs.filter(task_id=task)
    if before:
        runs = runs.filter(pk__lt=before)
    attempts = Attempt.objects.order_by("shard_index", "try_number")
    rows = list(
        runs.order_by("-id").prefetch_related(Prefetch("attempts", queryset=attempts))[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(runs=rows, next_before=rows[-1].pk if more and rows else None)
