"""Metrics of the agents' side (README, "Metrics and health").

Frames and sockets are counted by the agent consumer of this server process,
in memory, where it already holds them (Prometheus sums the processes). The
fleet's gauges, workers by state and slots, are the whole install's, read
from the database when /metrics is scraped (FleetCollector): one grouped read
of the workers table and one count of active attempts on the queue index.
"""

from __future__ import annotations

import logging

from django.db import DatabaseError
from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler_site.metrics import REGISTRY
from scheduler_site.wire import AGENT_FRAMES
from tasks_app.batchsql import marks, select, table
from tasks_app.models import Attempt
from workers_app.models import Worker

log = logging.getLogger(__name__)

FRAMES_RECEIVED = Counter(
    "scheduler_agent_frames_received",
    "Frames received from agents by this server process, by type; frames refused as"
    ' malformed, unknown or oversized count as type="invalid".',
    ["type"],
    registry=REGISTRY,
)
AGENT_SOCKETS = Gauge(
    "scheduler_agent_sockets",
    "Agent websockets connected to this server process.",
    registry=REGISTRY,
)
# Resolved once: a label lookup per frame would cost more than the count itself.
_BY_TYPE = {kind: FRAMES_RECEIVED.labels(kind) for kind in (*AGENT_FRAMES, "invalid")}


def frames_received(frames: list[dict], refused: int) -> None:
    """One message from an agent: its checked frames, and how many were refused."""
    for frame in frames:
        _BY_TYPE[frame["type"]].inc()
    if refused:
        _BY_TYPE["invalid"].inc(refused)


class FleetCollector(Collector):
    """Workers by state, slots in use and slots online, read at scrape time."""

    def describe(self):
        # What collect() yields, without the queries: the registry asks at
        # registration (at import, before the database may be read).
        return self._families()

    def collect(self):
        try:
            by_state, capacity, in_use = fleet_figures()
        except DatabaseError as exc:
            # tasks_app.metrics says so in scheduler_metrics_database_up.
            log.warning("metrics: the workers could not be read: %s", exc)
            return
        workers, slots_in_use, slots_capacity = self._families()
        for state in Worker.State.values:
            workers.add_metric([state], by_state.get(state, 0))
        slots_in_use.add_metric([], in_use)
        slots_capacity.add_metric([], capacity)
        yield from (workers, slots_in_use, slots_capacity)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "scheduler_workers",
                "Workers by state (revoked ones are disabled).",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "scheduler_slots_in_use",
                "Attempts assigned to or running on a worker: the slots they take.",
            ),
            GaugeMetricFamily(
                "scheduler_slots_capacity",
                "Slots of the online workers: what dispatch can fill (a worker's capacity, or"
                " less if its agent asks for less).",
            ),
        )


def fleet_figures() -> tuple[dict[str, int], int, int]:
    """({state: workers}, slots of online workers, active attempts)."""
    by_state, capacity = {}, 0
    for state, count, slots in select(
        "SELECT state, COUNT(*), SUM(CASE WHEN revoked_at IS NOT NULL OR approved_at IS NULL"
        " THEN 0 WHEN requested_capacity IS NOT NULL AND requested_capacity < capacity"
        f" THEN requested_capacity ELSE capacity END) FROM {table(Worker)} GROUP BY state"
    ):
        by_state[state] = count
        if state == Worker.State.ONLINE:
            capacity = int(slots or 0)
    ((in_use,),) = select(
        f"SELECT COUNT(*) FROM {table(Attempt)} WHERE status IN ({marks(Attempt.ACTIVE)})",
        list(Attempt.ACTIVE),
    )
    return by_state, capacity, in_use


REGISTRY.register(FleetCollector())
