"""Signals through which tasks_app tells others about new work.

tasks_app must not import workers_app (DESIGN.md: workers depend on tasks),
so the dispatcher subscribes to this instead of being called directly.
"""

from django.dispatch import Signal

# Sent after commit whenever attempts were queued; receivers try to dispatch them.
work_queued = Signal()

# Sent after commit with attempts=[(worker_id, attempt_id), ...] whose agents
# must kill the process (cancel, timeout backstop, re-queued assignment).
stop_requested = Signal()
