"""Reading run history: filtered, newest first, keyset-paginated.

Keyset (WHERE id < last seen) instead of OFFSET, so page 1,000 costs what
page 1 costs; the (status, -id) and (task, -id) indexes serve the filters.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch

from tasks_app.models import Attempt, Run


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
            if not raw.isdigit():
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
    attempts = Attempt.objects.only(
        "id",
        "run_id",
        "shard_index",
        "try_number",
        "worker_name",
        "status",
        "exit_code",
        "reason",
        "queued_at",
        "assigned_at",
        "started_at",
        "finished_at",
        "output_bytes",
        "stored_bytes",
        "truncated",
    )
    rows = list(
        runs.order_by("-id").prefetch_related(Prefetch("attempts", queryset=attempts))[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(runs=rows, next_before=rows[-1].pk if more and rows else None)
