"""The scheduler's time source, which tests can move.

Cron firing reads the time here (tasks_app.scheduling, a task's next fire
time): tests set it (`clock.set_now(t)`, or `with clock.frozen(t):`) to
simulate minutes or days of downtime without sleeping. Nothing sets it in a
running server, so the real scheduler always runs on real time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator

from django.utils import timezone

_fixed: dt.datetime | None = None


def now() -> dt.datetime:
    """The current time (aware, UTC), or the time a test has set."""
    return _fixed if _fixed is not None else timezone.now()


def set_now(value: dt.datetime | None) -> None:
    """Fix the time (an aware datetime), or go back to real time with None."""
    global _fixed
    if value is not None and value.tzinfo is None:
        raise ValueError("the clock takes an aware datetime")
    _fixed = value


@contextlib.contextmanager
def frozen(value: dt.datetime) -> Iterator[None]:
    """The clock reads `value` inside the block."""
    previous = _fixed
    set_now(value)
    try:
        yield
    finally:
        set_now(previous)
