"""Cron schedules: what an expression means, in a task's time zone, across DST.

Parsing and stepping are cronsim's (the library healthchecks.io runs on);
this module adds the aliases, the checks that give people clear messages,
and the daylight-saving notes shown next to each fire time.

Daylight saving time, as cronsim computes it (like cronie):
- A time in a DST gap (02:30 on a day clocks jump from 02:00 to 03:00) does
  not exist: a schedule naming that hour fires once at the first moment after
  the gap (03:00) instead; times that already match then (03:00) fire once.
- A repeated hour (clocks go back from 03:00 to 02:00): a schedule naming
  the hour (30 2 * * *) fires once, at the first 02:30; one with `*` in the
  hour field (0 * * * *, */15 * * * *) follows real time and fires in both.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

from cronsim import CronSim, CronSimError

from tasks_app.exceptions import InvalidSchedule

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS = ("minute", "hour", "day of month", "month", "day of week")
MAX_SCHEDULE_CHARS = 200


def expand(schedule: str) -> str:
    """The five fields of a schedule (an alias spelled out)."""
    schedule = " ".join(schedule.split())
    return ALIASES.get(schedule.lower(), schedule)


def check_schedule(schedule: str) -> str:
    """The schedule, tidied (blank: none); InvalidSchedule says what is wrong."""
    schedule = " ".join(schedule.split())
    if not schedule:
        return ""
    if len(schedule) > MAX_SCHEDULE_CHARS:
        raise InvalidSchedule(f"At most {MAX_SCHEDULE_CHARS} characters.")
    if schedule.startswith("@"):
        if schedule.lower() not in ALIASES:
            raise InvalidSchedule(
                f"Unknown shortcut {schedule!r}: use one of {', '.join(ALIASES)}."
            )
        return schedule.lower()
    fields = schedule.split(" ")
    if len(fields) != 5:
        raise InvalidSchedule(
            f"A cron expression has 5 fields ({', '.join(FIELDS)}); this one has {len(fields)}."
        )
    try:
        CronSim(schedule, dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    except CronSimError as exc:
        raise InvalidSchedule(f"Invalid cron expression {schedule!r}: {exc}.") from None
    return schedule


def check_timezone(name: str) -> str:
    """An IANA time zone name (Europe/Berlin); InvalidSchedule otherwise."""
    name = name.strip()
    if not name:
        raise InvalidSchedule("Give a time zone, e.g. UTC or Europe/Berlin.")
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(
            f"Unknown time zone {name!r}: use an IANA name such as UTC, Europe/Berlin "
            "or America/New_York."
        ) from None
    return name


def validate_schedule(value: str) -> None:
    """A model field validator (the admin's form): check_schedule's message."""
    from django.core.exceptions import ValidationError

    try:
        check_schedule(value)
    except InvalidSchedule as exc:
        raise ValidationError(str(exc)) from None


def validate_timezone(value: str) -> None:
    from django.core.exceptions import ValidationError

    try:
        check_timezone(value)
    except InvalidSchedule as exc:
        raise ValidationError(str(exc)) from None


def describe(schedule: str) -> str:
    """In words: "At 09:00 on Monday through Friday"."""
    try:
        return CronSim(expand(schedule), dt.datetime(2000, 1, 1, tzinfo=dt.UTC)).explain()
    except CronSimError:
        return schedule


def fire_times(schedule: str, tz: str, after: dt.datetime):
    """The fire times strictly after `after`, in the zone `tz`, one by one."""
    zone = zoneinfo.ZoneInfo(tz)
    return CronSim(expand(schedule), after.astimezone(zone))


def next_fire(schedule: str, tz: str, after: dt.datetime) -> dt.datetime | None:
    """The first fire time after `after` (in UTC), or None if it never fires."""
    try:
        return next(fire_times(schedule, tz, after)).astimezone(dt.UTC)
    except StopIteration:
        return None


def latest_fire(schedule: str, tz: str, at_or_before: dt.datetime) -> dt.datetime | None:
    """The last fire time at or before `at_or_before` (in UTC), or None."""
    zone = zoneinfo.ZoneInfo(tz)
    # cronsim steps back from a time exclusive of it: start a second later.
    start = (at_or_before + dt.timedelta(seconds=1)).astimezone(zone)
    try:
        return next(CronSim(expand(schedule), start, reverse=True)).astimezone(dt.UTC)
    except StopIteration:
        return None


@dataclass(frozen=True)
class FireTime:
    at: dt.datetime  # in the task's zone
    dst: str | None = None  # "gap" or "repeat"
    note: str = ""

    @property
    def text(self) -> str:
        """As people read it in the task's zone: "Sun 2026-03-29 03:00 CEST (+02:00)"."""
        offset = self.at.strftime("%z")
        return f"{self.at.strftime('%a %Y-%m-%d %H:%M %Z')} ({offset[:3]}:{offset[3:]})"

    def as_json(self) -> dict:
        return {"at": self.at.isoformat(), "dst": self.dst, "note": self.note}


def _wall(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=None, fold=0)


def _matches_wall(expr: str, wall: dt.datetime) -> bool:
    """The expression names this wall-clock minute (no zone, no DST)."""
    return next(CronSim(expr, wall - dt.timedelta(minutes=1))) == wall


def _annotate(expr: str, at: dt.datetime) -> FireTime:
    zone = at.tzinfo
    instant = at.astimezone(dt.UTC)
    before = (instant - dt.timedelta(seconds=1)).astimezone(zone)
    jump = at.utcoffset() - before.utcoffset()
    if jump > dt.timedelta(0):
        # Just after clocks jumped forward: did the schedule name a time that
        # did not exist? Looked for on the wall clock, which has no gap.
        start = _wall(at) - jump
        missing = []
        probe = CronSim(expr, start - dt.timedelta(minutes=1))
        for wall in probe:
            if wall >= _wall(at):
                break
            missing.append(wall.strftime("%H:%M"))
        if missing:
            names = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            clock_time = at.strftime("%H:%M")
            if _matches_wall(expr, _wall(at)):
                note = f"skipped; {clock_time} fires as usual, once"
            else:
                note = f"shifted to {clock_time}"
            verb = "does" if len(missing) == 1 else "do"
            return FireTime(at, "gap", f"{names} {verb} not exist this day (DST gap): {note}")
    other = at.replace(fold=1 - at.fold)
    if other.utcoffset() != at.utcoffset():
        if at.fold == 1 or _fires_at(expr, other):
            note = (
                "this hour happens twice (clocks go back): the schedule follows real "
                "time, so it fires in both"
            )
        else:
            note = "this hour happens twice (clocks go back): it fires once, at the first"
        return FireTime(at, "repeat", f"{at.strftime('%H:%M')}: {note}")
    return FireTime(at)


def _fires_at(expr: str, at: dt.datetime) -> bool:
    instant = at.astimezone(dt.UTC)
    following = next(CronSim(expr, (instant - dt.timedelta(seconds=1)).astimezone(at.tzinfo)))
    return following.astimezone(dt.UTC) == instant


def upcoming(schedule: str, tz: str, after: dt.datetime, n: int = 5) -> list[FireTime]:
    """The next `n` fire times after `after`, in the zone, with DST notes."""
    if not schedule:
        return []
    expr = expand(schedule)
    times = []
    for at in fire_times(schedule, tz, after):
        times.append(_annotate(expr, at))
        if len(times) == n:
            break
    return times


def next_runs(task, n: int = 5, after: dt.datetime | None = None) -> list[FireTime]:
    """A task's next `n` fire times in its zone: [] when it does not fire
    (no schedule, schedule paused, task disabled)."""
    from tasks_app import clock

    if not task.schedule or task.schedule_paused or not task.enabled:
        return []
    return upcoming(task.schedule, task.timezone, after or clock.now(), n)
