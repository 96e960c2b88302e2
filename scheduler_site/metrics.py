"""The registry every metric of this process is kept in, and its text.

A registry of our own, not prometheus_client's global one: the global one
also carries the client library's process and platform collectors, which the
tests and a second app in one process (the test client's, a management
command's) would see change under them or register twice.

Where a metric is observed (README, "Metrics and health"): counters and
histograms in the code that makes the change, per server process (each
`serve` is a scrape target of its own and Prometheus sums them); gauges of
the whole install (the queue, the workers, the slots) by collectors that
read the database when /metrics is scraped, with a few aggregate queries
(tasks_app.metrics, workers_app.metrics).
"""

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

# No `*_created` series beside every counter and histogram: they double the
# text and no query of ours needs them (rate() copes with restarts). A switch
# of the library's, for the whole process.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)


def exposition() -> bytes:
    """The Prometheus text format of every metric; the collectors query now."""
    # Imported here so that both apps' metrics are registered whoever scrapes
    # first (the modules register at import; the hot paths import them too).
    from tasks_app import metrics as runs  # noqa: F401
    from workers_app import metrics as fleet  # noqa: F401

    return generate_latest(REGISTRY)
