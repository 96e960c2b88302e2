"""The workers tasks_app's routing may name (tasks_app.routing.Directory).

Registered at start-up (apps.py): tasks_app asks through it which worker a
name means and who is online to broadcast to, without importing workers_app.
"""

from __future__ import annotations

from collections.abc import Iterable

from tasks_app.routing import OnlineWorker
from workers_app.models import Worker


class WorkerDirectory:
    def ids_by_name(self, names: Iterable[str]) -> dict[str, int]:
        names = [n for n in names if n]
        if not names:
            return {}
        # A revoked worker never takes work again: as good as gone for a pin.
        workers = Worker.objects.filter(name__in=names, revoked_at__isnull=True)
        return dict(workers.values_list("name", "pk"))

    def taking_work(self) -> list[OnlineWorker]:
        """Online, approved, not draining at an operator's request, not revoked:
        the workers dispatch would give new work to (see dispatch._load)."""
        rows = Worker.objects.filter(
            state=Worker.State.ONLINE,
            approved_at__isnull=False,
            drain_requested=False,
            revoked_at__isnull=True,
        ).values_list("pk", "name", "labels")
        return [OnlineWorker(pk, name, frozenset(labels or ())) for pk, name, labels in rows]
