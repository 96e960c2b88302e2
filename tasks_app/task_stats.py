"""How a task has been doing: success rate and durations over its recent runs.

Read from its last N finished runs in one query (the (task, -id) index,
newest first); the last success and failure come from that window, and
only when one is not in it, from one more query each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from tasks_app.models import Run

WINDOW = 100
# Cancelled runs say nothing about the task's health: someone stopped them.
COUNTED = (Run.Status.SUCCEEDED, Run.Status.FAILED)


@dataclass
class TaskStats:
    window: int
    finished: int
    succeeded: int
    p50: timedelta | None
    p95: timedelta | None
    last_success: Run | None
    last_failure: Run | None

    @property
    def success_rate(self) -> float | None:
        """Percent of the counted runs that succeeded; None before the first."""
        return 100.0 * self.succeeded / self.finished if self.finished else None


def percentile(ordered: list[timedelta], p: float) -> timedelta | None:
    """Nearest-rank percentile of an ascending list: a duration that happened."""
    if not ordered:
        return None
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def task_stats(task_id: int, window: int | None = None) -> TaskStats:
    window = window or WINDOW
    fields = ("id", "status", "created_at", "started_at", "finished_at")
    recent = list(
        Run.objects.filter(task_id=task_id, status__in=COUNTED)
        .order_by("-id")
        .only(*fields)[:window]
    )
    # Fewer than asked for: the window holds the task's whole counted history.
    whole = len(recent) < window
    durations = sorted(run.duration for run in recent if run.duration is not None)
    return TaskStats(
        window=window,
        finished=len(recent),
        succeeded=sum(run.status == Run.Status.SUCCEEDED for run in recent),
        p50=percentile(durations, 50),
        p95=percentile(durations, 95),
        last_success=_latest(recent, whole, task_id, Run.Status.SUCCEEDED, fields),
        last_failure=_latest(recent, whole, task_id, Run.Status.FAILED, fields),
    )


def _latest(recent: list[Run], whole: bool, task_id: int, status: str, fields) -> Run | None:
    found = next((run for run in recent if run.status == status), None)
    if found is not None or whole:
        return found
    return (
        Run.objects.filter(task_id=task_id, status=status, pk__lt=recent[-1].pk)
        .order_by("-id")
        .only(*fields)
        .first()
    )


STRIP = 50


def recent_runs(task_id: int, count: int = STRIP) -> list[Run]:
    """Its newest `count` runs of any status, oldest first (a strip reads left
    to right, newest at the end): one probe of the (task, -id) index."""
    fields = ("id", "status", "created_at", "started_at", "finished_at")
    newest = Run.objects.filter(task_id=task_id).order_by("-id").only(*fields)[:count]
    return list(reversed(newest))
