"""How the dashboard says durations, exit codes and states (tasks_app/templatetags/sched.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from tasks_app.templatetags.sched import code_spans, duration, exit_text, plural_verb, prose


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (-0.003, "0 ms"),  # never negative, whatever a clock did
        (0.0034, "3 ms"),
        (0.42, "420 ms"),
        (2.5, "2.5 s"),
        (42.25, "42.2 s"),
        (185, "3 min 5 s"),
        (7800, "2 h 10 min"),
        (3 * 86400 + 7200, "3 d 2 h"),
    ],
)
def test_a_duration_is_said_in_the_largest_sensible_unit(seconds, said):
    assert duration(seconds) == said
    assert duration(dt.timedelta(seconds=seconds)) == said


def test_a_missing_duration_is_a_dash():
    assert duration(None) == "—"


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0, "0"),
        (3, "3"),
        (-15, "killed by SIGTERM"),
        (-9, "killed by SIGKILL"),
        (-99, "killed by signal 99"),
        (None, "—"),
        ("", "—"),  # a skipped run has no attempt: the template's missing value
    ],
)
def test_an_exit_code_below_zero_is_the_signal_that_killed_the_command(code, said):
    assert exit_text(code) == said


def test_a_count_picks_its_verb():
    assert [plural_verb(n, "stays,stay") for n in (0, 1, 2)] == ["stay", "stays", "stay"]


def test_markdown_style_code_is_escaped_then_shown_as_code():
    assert code_spans("send `<token>` & wait") == "send <code>&lt;token&gt;</code> &amp; wait"
    assert prose("one\nline\n\n`two`") == "<p>one line</p><p><code>two</code></p>"


def test_a_time_is_written_in_the_servers_zone_with_utc_for_the_script_and_the_hover(settings):
    from django.utils import timezone

    from tasks_app.templatetags.sched import clock, when

    settings.TIME_ZONE = "Europe/Paris"
    instant = dt.datetime(2026, 3, 1, 12, 0, 5, 250000, tzinfo=dt.UTC)
    with timezone.override("Europe/Paris"):
        assert when(instant) == (
            '<time datetime="2026-03-01T12:00:05.250Z" title="2026-03-01 12:00:05 UTC"'
            ' data-local="datetime">2026-03-01 13:00:05 CET</time>'
        )
        assert clock(instant) == (
            '<time datetime="2026-03-01T12:00:05.250Z" title="2026-03-01 12:00:05 UTC"'
            ' data-local="time">13:00:05</time>'
        )
    assert when(None) == "—"
