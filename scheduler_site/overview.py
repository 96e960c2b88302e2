"""The home page: what the scheduler is doing now and lately, at a glance.

It lives with the site rather than in one app because it shows both: runs
(tasks_app.overview) and workers (workers_app.load), and workers_app may
know tasks_app but never the reverse. Each region of the page is a partial
of the one template; `?part=<name>` with the HX-Request header returns that
region alone (the live page re-renders a region when its events arrive) and
computes only what that region shows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from django.http import HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from tasks_app import charts, overview, retention
from tasks_app.roles import VIEWER, role_required
from workers_app import load


class Snapshot:
    """One request's reads: what two regions both need is read once."""

    def __init__(self) -> None:
        self.now = timezone.now()

    @cached_property
    def day(self) -> overview.DayRollup:
        return overview.DayRollup(self.now)


def _now_part(snap: Snapshot) -> dict:
    return {"now_counts": overview.now_counts()}


def _chart(series: overview.Series, buckets: list, ticks: list, title: str) -> dict:
    return {
        "buckets": buckets,
        "total": sum(b.total for b in buckets),
        "svg": charts.stacked_bars(
            buckets, overview.FINAL, title=title, ticks=ticks, chart_id=f"chart-{series.name}"
        ),
    }


def _activity_part(snap: Snapshot) -> dict:
    hour = overview.finished_series(overview.LAST_HOUR, snap.now)
    return {
        "statuses": overview.FINAL,
        "per_minute": _chart(
            overview.LAST_HOUR,
            hour,
            [(0, "−60 min"), (30, "−30 min"), (59, "now")],
            "Runs finished per minute, last hour",
        ),
        "per_hour": _chart(
            overview.LAST_DAY,
            snap.day.series(),
            [(0, "−24 h"), (12, "−12 h"), (23, "now")],
            "Runs finished per hour, last 24 hours",
        ),
    }


def _tasks_part(snap: Snapshot) -> dict:
    return {"task_health": overview.task_health(snap.now, rollup=snap.day), "task_window_h": 24}


def _workers_part(snap: Snapshot) -> dict:
    busiest, idle = load.busiest_and_idle(snap.now)
    return {"busiest": busiest, "idle": idle}


def _failures_part(snap: Snapshot) -> dict:
    return {"failures": overview.latest_failures()}


PARTS: dict[str, Callable[[Snapshot], dict]] = {
    "now": _now_part,
    "activity": _activity_part,
    "tasks": _tasks_part,
    "workers": _workers_part,
    "failures": _failures_part,
}


@require_GET
@role_required(VIEWER)
def overview_page(request):
    part = request.GET.get("part", "")
    if part and part not in PARTS:
        return HttpResponseBadRequest(
            f"Unknown part {part[:40]!r}: one of {', '.join(PARTS)}.", content_type="text/plain"
        )
    snap = Snapshot()
    if part and request.htmx:
        return render(request, f"overview.html#overview-{part}", PARTS[part](snap))
    context: dict = {}
    for build in PARTS.values():
        context |= build(snap)
    # What the history below these figures reaches back to (retention).
    context["kept"] = retention.kept()
    return render(request, "overview.html", context)
