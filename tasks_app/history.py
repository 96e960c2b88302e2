"""Reading run history: filtered, newest first, keyset-paginated.

Keyset (WHERE id < last seen) instead of OFFSET, so page 1,000 costs what
page 1 costs; the (status, -id) and (task, -id) indexes serve the filters.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks_app.models import Attempt, DeletedTask, Run
from tasks_app.validators import MAX_ID


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
            filters[name] = parse_id(name, raw)
    return filters


def parse_id(name: str, raw: str) -> int:
    """A query parameter that is a row id; InvalidFilter naming it otherwise."""
    # isascii(): str.isdigit() accepts "²", which int() rejects (a 500, not a
    # 400); the length and upper bound keep it inside a 64-bit database integer
    # (and under int()'s 4,300-digit limit).
    digits = raw.isascii() and raw.isdigit() and len(raw) <= 19
    if not digits or not 1 <= int(raw) <= MAX_ID:
        raise InvalidFilter(f"{name} must be a positive whole number, not {raw[:40]!r}")
    return int(raw)


def runs_page(
    *,
    status: str = "",
    task: int | None = None,
    before: int | None = None,
    limit: int = 50,
    brief: bool = False,
) -> Page:
    """Runs newest first, each with its attempts (`attempt_list`) and `latest_attempt`.

    brief: only what the runs table shows (no snapshot, attempts' worker and
    exit code only): the dashboard's list stays cheap at any page size.
    """
    runs = Run.objects.all()
    if status:
        runs = runs.filter(status=status)
    if task:
        runs = runs.filter(task_id=task)
    if before:
        runs = runs.filter(pk__lt=before)
    if brief:
        runs = runs.defer("definition", "params")
    rows = list(runs.order_by("-id")[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    # The attempts of the page's runs in one query, grouped here rather than by
    # prefetch_related, which builds a QuerySet per run.
    attempts = Attempt.objects.filter(run_id__in=[run.pk for run in rows]).order_by(
        "run_id", "shard_index", "try_number"
    )
    if brief:
        attempts = attempts.only("id", "run_id", "worker_name", "exit_code")
    by_run: dict[int, list[Attempt]] = {}
    for attempt in attempts:
        by_run.setdefault(attempt.run_id, []).append(attempt)
    mark_deleted_tasks(rows)
    for run in rows:
        run.attempt_list = by_run.get(run.pk, [])
        run.latest_attempt = max(run.attempt_list, key=lambda a: a.pk, default=None)
    return Page(runs=rows, next_before=rows[-1].pk if more and rows else None)


def mark_deleted_tasks(runs) -> None:
    """Set `task_deleted` on each run: one query for the page, not one per run."""
    ids = {run.task_id for run in runs if run.task_id}
    gone = (
        set(DeletedTask.objects.filter(pk__in=ids).values_list("pk", flat=True)) if ids else set()
    )
    for run in runs:
        run.task_deleted = run.task_id in gone
