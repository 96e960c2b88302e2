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
from datetime import datetime

from django.http import HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from tasks_app import charts, overview
from tasks_app.roles import VIEWER, role_required
from workers_app import load


def _now_part(now: datetime) -> dict:
    return {"now_counts": overview.now_counts()}


def _chart(series: overview.Series, now: datetime, ticks: list, title: str) -> dict:
    buckets = overview.finished_series(series, now)
    return {
        "buckets": buckets,
        "total": sum(b.total for b in buckets),
        "svg": charts.stacked_bars(
            buckets, overview.FINAL, title=title, ticks=ticks, chart_id=f"chart-{series.name}"
        ),
    }


def _activity_part(now: datetime) -> dict:
    hour_ticks = [(0, "−60 min"), (30, "−30 min"), (59, "now")]
    day_ticks = [(0, "−24 h"), (12, "−12 h"), (23, "now")]
    return {
        "statuses": overview.FINAL,
        "per_minute": _chart(
            overview.LAST_HOUR, now, hour_ticks, "Runs finished per minute, last hour"
        ),
        "per_hour": _chart(overview.LAST_DAY, now, day_ticks, "Runs finished per hour, last day"),
    }


def _tasks_part(now: datetime) -> dict:
    return {"task_health": overview.task_health(now), "task_window_h": 24}


def _workers_part(now: datetime) -> dict:
    busiest, idle = load.busiest_and_idle(now)
    return {"busiest": busiest, "idle": idle}


def _failures_part(now: datetime) -> dict:
    return {"failures": overview.latest_failures()}


PARTS: dict[str, Callable[[datetime], dict]] = {
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
    now = timezone.now()
    if part and request.htmx:
        return render(request, f"overview.html#overview-{part}", PARTS[part](now))
    context: dict = {}
    for build in PARTS.values():
        context |= build(now)
    return render(request, "overview.html", context)
