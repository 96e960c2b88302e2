"""Cron expressions in a task's time zone: known fire times across DST, and bad input."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from tasks_app import cron
from tasks_app.exceptions import InvalidSchedule

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def at(tz: str, *parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=zoneinfo.ZoneInfo(tz))


def upcoming(schedule, tz, after, n=4):
    return [(f.at.isoformat(), f.dst) for f in cron.upcoming(schedule, tz, after, n)]


def test_it_shifts_a_time_in_berlins_spring_gap_to_the_first_moment_after_it():
    # 2026-03-29: clocks jump from 02:00 CET to 03:00 CEST; 02:30 does not exist.
    assert upcoming("30 2 * * *", BERLIN, at(BERLIN, 2026, 3, 28, 12), 3) == [
        ("2026-03-29T03:00:00+02:00", "gap"),
        ("2026-03-30T02:30:00+02:00", None),
        ("2026-03-31T02:30:00+02:00", None),
    ]
    [first] = cron.upcoming("30 2 * * *", BERLIN, at(BERLIN, 2026, 3, 28, 12), 1)
    assert first.note == "02:30 does not exist this day (DST gap): shifted to 03:00"


def test_it_runs_an_hourly_schedule_on_real_time_through_berlins_spring_gap():
    times = upcoming("0 * * * *", BERLIN, at(BERLIN, 2026, 3, 29, 0, 30), 3)
    # No 02:00 that day; in UTC the hours follow each other without a hole.
    assert times == [
        ("2026-03-29T01:00:00+01:00", None),
        ("2026-03-29T03:00:00+02:00", "gap"),
        ("2026-03-29T04:00:00+02:00", None),
    ]
    utc = [
        f.at.astimezone(dt.UTC)
        for f in cron.upcoming("0 * * * *", BERLIN, at(BERLIN, 2026, 3, 29, 0, 30), 3)
    ]
    assert [t.hour for t in utc] == [0, 1, 2]
    [_, gap, _] = cron.upcoming("0 * * * *", BERLIN, at(BERLIN, 2026, 3, 29, 0, 30), 3)
    assert gap.note == (
        "02:00 does not exist this day (DST gap): skipped; 03:00 fires as usual, once"
    )


def test_it_fires_a_time_in_berlins_autumn_repeat_once():
    # 2026-10-25: clocks go back from 03:00 CEST to 02:00 CET; 02:30 happens twice.
    assert upcoming("30 2 * * *", BERLIN, at(BERLIN, 2026, 10, 24, 12), 3) == [
        ("2026-10-25T02:30:00+02:00", "repeat"),
        ("2026-10-26T02:30:00+01:00", None),
        ("2026-10-27T02:30:00+01:00", None),
    ]
    [first] = cron.upcoming("30 2 * * *", BERLIN, at(BERLIN, 2026, 10, 24, 12), 1)
    assert first.note == (
        "02:30: this hour happens twice (clocks go back): it fires once, at the first"
    )


def test_it_fires_an_hourly_schedule_in_both_of_berlins_repeated_hours():
    assert upcoming("0 * * * *", BERLIN, at(BERLIN, 2026, 10, 25, 0, 30), 4) == [
        ("2026-10-25T01:00:00+02:00", None),
        ("2026-10-25T02:00:00+02:00", "repeat"),
        ("2026-10-25T02:00:00+01:00", "repeat"),
        ("2026-10-25T03:00:00+01:00", None),
    ]


def test_it_keeps_new_yorks_wall_clock_time_across_both_changes():
    # 2026-03-08 (EST -> EDT) and 2026-11-01 (EDT -> EST): 09:00 stays 09:00.
    assert upcoming("0 9 * * *", NEW_YORK, at(NEW_YORK, 2026, 3, 7, 0), 2) == [
        ("2026-03-07T09:00:00-05:00", None),
        ("2026-03-08T09:00:00-04:00", None),
    ]
    assert upcoming("0 9 * * *", NEW_YORK, at(NEW_YORK, 2026, 10, 31, 0), 2) == [
        ("2026-10-31T09:00:00-04:00", None),
        ("2026-11-01T09:00:00-05:00", None),
    ]
    assert upcoming("30 2 * * *", NEW_YORK, at(NEW_YORK, 2026, 3, 7, 12), 2) == [
        ("2026-03-08T03:00:00-04:00", "gap"),
        ("2026-03-09T02:30:00-04:00", None),
    ]
    assert upcoming("30 1 * * *", NEW_YORK, at(NEW_YORK, 2026, 10, 31, 12), 2) == [
        ("2026-11-01T01:30:00-04:00", "repeat"),
        ("2026-11-02T01:30:00-05:00", None),
    ]


def test_it_steps_from_inside_a_repeated_hour_without_going_back():
    # After the second 02:15 (CET), the next quarter is 02:30 CET, not CEST.
    after = dt.datetime(2026, 10, 25, 1, 15, tzinfo=dt.UTC)  # 02:15 CET, the second one
    assert cron.next_fire("*/15 * * * *", BERLIN, after) == dt.datetime(
        2026, 10, 25, 1, 30, tzinfo=dt.UTC
    )
    assert cron.latest_fire("*/15 * * * *", BERLIN, after) == after


@pytest.mark.parametrize(
    ("alias", "expanded"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
    ],
)
def test_it_reads_the_aliases(alias, expanded):
    assert cron.check_schedule(alias) == alias
    assert cron.expand(alias) == expanded


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (
            "* * * *",
            "A cron expression has 5 fields (minute, hour, day of month, month, "
            "day of week); this one has 4.",
        ),
        (
            "* * * * * *",
            "A cron expression has 5 fields (minute, hour, day of month, month, "
            "day of week); this one has 6.",
        ),
        ("61 * * * *", "Invalid cron expression '61 * * * *': Bad minute."),
        ("0 0 31 2 *", "Invalid cron expression '0 0 31 2 *': Bad day-of-month."),
        (
            "@often",
            "Unknown shortcut '@often': use one of @yearly, @annually, @monthly, "
            "@weekly, @daily, @midnight, @hourly.",
        ),
    ],
)
def test_it_says_what_is_wrong_with_a_bad_expression(schedule, message):
    with pytest.raises(InvalidSchedule) as caught:
        cron.check_schedule(schedule)
    assert str(caught.value) == message


def test_it_refuses_an_unknown_time_zone():
    with pytest.raises(InvalidSchedule) as caught:
        cron.check_timezone("Mars/Olympus_Mons")
    assert str(caught.value) == (
        "Unknown time zone 'Mars/Olympus_Mons': use an IANA name such as UTC, "
        "Europe/Berlin or America/New_York."
    )
    assert cron.check_timezone(" Europe/Berlin ") == "Europe/Berlin"
