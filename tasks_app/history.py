"""Reading run history: filtered, newest first, keyset-paginated.

Runs are listed newest first by (created_at, id): a time range is then a
range of the same index that orders the page, instead of a filter over
everything newer. The cursor is a run's id (`before`): the next page holds
the runs that sort after it, found with one probe for its created_at and a
range condition (never OFFSET), so page 1,000 costs what page 1 costs, and
runs that share a created_at are neither repeated nor skipped (the id breaks
the tie).

Filters, combined with AND; every one has an index that orders by
(created_at, id) or narrows the rows enough to sort them:
- task: one task's id (a deleted task's too): (task, created_at, id).
- name: runs whose task name starts with this, case-insensitively. A prefix,
  not "contains": a prefix of UPPER(task_name) is a range of an index
  (text_pattern_ops on PostgreSQL), while "contains" over a million rows
  needs pg_trgm, which is not guaranteed to be installed.
- status / trigger: one or several (IN): (status, created_at, id), and for a
  trigger the created_at order itself (the rarest trigger is still 1 run in 20).
- worker: runs with an attempt on the worker of that name (names stay in
  history after a worker is deleted): EXISTS over (worker_name, run).
- since / until: created at or after / before; a day or a time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import dateparse, timezone

from tasks_app.models import Attempt, DeletedTask, Run
from tasks_app.validators import MAX_ID

MAX_TEXT_FILTER = 200
# Multi-valued filters: status and trigger may be repeated or comma-separated.
LIST_FILTERS = ("status", "trigger")
# In the order links carry them.
FILTERS = ("status", "task", "name", "worker", "trigger", "since", "until", "before")


class InvalidFilter(ValueError):
    """A filter value in the query string is not usable."""


@dataclass
class Page:
    runs: list[Run]
    next_before: int | None


def _values(params, name: str) -> list[str]:
    """Every value of a parameter: repeated (?status=a&status=b) or comma-separated."""
    raw = params.getlist(name) if hasattr(params, "getlist") else [params.get(name) or ""]
    return [part.strip() for value in raw for part in (value or "").split(",") if part.strip()]


def _choices(name: str, params, allowed: Sequence[str]) -> list[str]:
    picked = []
    for value in _values(params, name):
        if value not in allowed:
            raise InvalidFilter(f"unknown {name} {value[:40]!r}; use one of {', '.join(allowed)}")
        if value not in picked:
            picked.append(value)
    return picked


def parse_filters(params) -> dict:
    """The runs filters of a query dict, checked; raises InvalidFilter naming
    the bad one. Only the filters given are in the answer."""
    filters: dict = {}
    for name in ("task", "before"):
        raw = (params.get(name) or "").strip()
        if raw:
            filters[name] = parse_id(name, raw)
    for name in ("name", "worker"):
        value = (params.get(name) or "").strip()
        if len(value) > MAX_TEXT_FILTER:
            raise InvalidFilter(f"{name} must be at most {MAX_TEXT_FILTER} characters")
        if "\x00" in value:
            raise InvalidFilter(f"{name} must not contain a NUL character")
        if value:
            filters[name] = value
    status = _choices("status", params, Run.Status.values)
    if status:
        filters["status"] = status
    trigger = _choices("trigger", params, Run.Trigger.values)
    if trigger:
        filters["trigger"] = trigger
    for name in ("since", "until"):
        raw = (params.get(name) or "").strip()
        if raw:
            filters[name] = parse_moment(name, raw, naive=True)
    if "since" in filters and "until" in filters and filters["since"] >= filters["until"]:
        raise InvalidFilter("since must be earlier than until")
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


def parse_moment(name: str, raw: str, *, naive: bool = False) -> dt.datetime:
    """A day or a time, for a `since`/`until` filter; `until` a day means
    through its end. naive: a time without an offset is read in the server's
    time zone (TIME_ZONE), as a browser's datetime-local field sends it;
    otherwise it is refused."""
    try:
        day = dateparse.parse_date(raw) if len(raw) == 10 else None
        moment = None if day else dateparse.parse_datetime(raw)
    except ValueError:
        day = moment = None
    form = (
        "a time (2026-01-31T09:00, or with its offset 2026-01-31T09:00:00+00:00)"
        if naive
        else "a time with its offset (2026-01-31T09:00:00+00:00)"
    )
    problem = InvalidFilter(
        f"{name} must be a date (2026-01-31) or {form} in the years 2 to 9998, not {raw[:40]!r}"
    )
    if day is not None:
        moment = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        if name == "until":
            moment += dt.timedelta(days=1) if day.year < 9999 else dt.timedelta()
    if moment is not None and timezone.is_naive(moment):
        if not naive or not 2 <= moment.year <= 9998:
            raise problem
        moment = timezone.make_aware(moment)
    if moment is None:
        raise problem
    # Kept off the ends of the calendar: a day after 9999-12-31 or a time
    # before year 1 in UTC does not exist (OverflowError, a 500).
    if not 2 <= moment.year <= 9998:
        raise problem
    return moment


def query_string_values(filters: dict) -> dict:
    """Filters as query parameters again (times in ISO 8601, lists as repeated
    values: urlencode with doseq), for links that keep them."""
    return {
        k: v.isoformat() if isinstance(v, dt.datetime) else v
        for k, v in sorted(filters.items(), key=lambda item: FILTERS.index(item[0]))
    }


def filtered_runs(
    *,
    task: int | None = None,
    name: str = "",
    status: Sequence[str] | str = (),
    worker: str = "",
    trigger: Sequence[str] | str = (),
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
):
    """The runs that match every filter given, unordered."""
    runs = Run.objects.all()
    if task:
        runs = runs.filter(task_id=task)
    if name:
        # UPPER(task_name) LIKE 'PREFIX%': the run_name_prefix index on PostgreSQL.
        runs = runs.filter(task_name__istartswith=name)
    for field, value in (("status", status), ("trigger", trigger)):
        values = [value] if isinstance(value, str) else list(value)
        values = [v for v in values if v]
        if len(values) == 1:
            runs = runs.filter(**{field: values[0]})
        elif values:
            runs = runs.filter(**{f"{field}__in": values})
    if worker:
        on_worker = Attempt.objects.filter(run_id=OuterRef("pk"), worker_name=worker)
        runs = runs.filter(Exists(on_worker))
    if since:
        runs = runs.filter(created_at__gte=since)
    if until:
        runs = runs.filter(created_at__lt=until)
    return runs


def runs_page(
    *, before: int | None = None, limit: int = 50, brief: bool = False, **filters
) -> Page:
    """Runs newest first, each with its attempts (`attempt_list`) and `latest_attempt`.

    before: a run's id; the page starts after it in the list's order. A run
    that is no longer stored cannot say where that is: InvalidFilter.
    brief: only what the runs table shows (no snapshot, attempts' worker and
    exit code only): the dashboard's list stays cheap at any page size.
    """
    runs = filtered_runs(**filters)
    if before:
        at = Run.objects.filter(pk=before).values_list("created_at", flat=True).first()
        if at is None:
            raise InvalidFilter(
                f"before: run {before} is no longer stored; start again from the newest runs"
            )
        # (created_at, id) < (at, before), written as a range on created_at
        # (an index condition on both engines) and a filter that only looks
        # at the runs created in the same instant: an OR alone is no range,
        # and a deep page would scan every newer run.
        runs = runs.filter(Q(created_at__lt=at) | Q(pk__lt=before), created_at__lte=at)
    if brief:
        runs = runs.defer("definition", "params")
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # For this query only (SET LOCAL), measured with 1,000,000 runs
            # (tests/runs_search_bench.py): a page is at most a few hundred
            # rows, and a parallel plan's worker start-up costs more than it
            # saves (the worker filter: 23-106 ms parallel, 7-18 ms serial on
            # the 2-core machine); and an index probe of a page that is cached
            # (it is, for a list people page through) is no 4x a sequential
            # read, the default's guess for spinning disks: at 1.1 the planner
            # probes the worker's attempts per failed run (16-19 ms) instead of
            # hashing all 25,000 of them (92-102 ms).
            with connection.cursor() as cursor:
                cursor.execute(
                    "SET LOCAL max_parallel_workers_per_gather = 0;"
                    " SET LOCAL random_page_cost = 1.1"
                )
        rows = list(runs.order_by("-created_at", "-id")[: limit + 1])
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
