"""How the dashboard says times, durations, exit codes and states.

One place, so every page says them the same way: times to the second with
their zone (the full ISO time on hover), durations in the largest sensible
unit, a negative exit code as the signal that killed the command, and
status identifiers as words.
"""

from __future__ import annotations

import datetime as dt
import re
import signal

from django import template
from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe

from tasks_app import logs

register = template.Library()


def _time_tag(value, shown: str, kind: str):
    """A <time> the browser rewrites into its viewer's zone (static/js/localtime.js).

    Its text, until then (and without JavaScript), is `shown` of the time in
    the server's zone (SCHEDULER_TIME_ZONE, UTC by default); the title, on
    hover, is always the UTC time; `data-local` says which form the script
    writes: "datetime" (date and time) or "time" (the time of day only).
    """
    if not value:
        return "—"
    local = timezone.localtime(value)
    utc = value.astimezone(dt.UTC)
    return format_html(
        '<time datetime="{}" title="{}" data-local="{}">{}</time>',
        utc.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
        kind,
        local.strftime(shown),
    )


@register.filter
def when(value):
    """'2026-11-29 01:02:03 UTC', the viewer's zone once the script ran, UTC on hover."""
    return _time_tag(value, "%Y-%m-%d %H:%M:%S %Z", "datetime")


@register.filter
def clock(value):
    """'01:02:03' (a time on the same page as its date), UTC date and time on hover."""
    return _time_tag(value, "%H:%M:%S", "time")


def seconds_text(seconds: float) -> str:
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


@register.filter
def duration(value):
    """A timedelta or a number of seconds as '420 ms', '2.5 s', '3 min 5 s', '2 h 10 min'."""
    if value is None or value == "":
        return "—"
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    return seconds_text(float(value))


def exit_text(code: int | None) -> str:
    """How a command ended: 'exit 1', or 'killed by SIGTERM' for the agent's -15."""
    if code is None or code == "":  # "": a run with no attempt (skipped) in a template
        return "—"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return str(code)


register.filter("exit_text", exit_text)


@register.filter
def status_label(value) -> str:
    """'timed_out' -> 'timed out': a state as a word, not an identifier."""
    return str(value or "").replace("_", " ")


@register.filter
def plural_verb(count, forms: str = "s,") -> str:
    """The verb for a count: {{ n }} run{{ n|pluralize }} {{ n|plural_verb:'stays,stay' }}."""
    singular, _, plural = forms.partition(",")
    return singular if count == 1 else plural


_CODE_SPAN = re.compile(r"`([^`]+)`")


@register.filter
def code_spans(text) -> str:
    """Escaped text whose `backticked` parts are shown as code."""
    return mark_safe(_CODE_SPAN.sub(r"<code>\1</code>", str(escape(str(text or "")))))


@register.filter
def prose(text) -> str:
    """Plain text written like Markdown: paragraphs on blank lines, `code` spans.

    The API's descriptions are written once, for the OpenAPI document; this
    shows them on the docs page without their backticks and hard line breaks.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(text or "")) if p.strip()]
    return mark_safe("".join(f"<p>{code_spans(p)}</p>" for p in paragraphs))


@register.filter
def cron_words(schedule: str) -> str:
    """A schedule in words: "At 09:00 on Monday through Friday"."""
    from tasks_app import cron

    return cron.describe(schedule) if schedule else ""


@register.filter
def truncation_notice(attempt) -> str:
    """What the run page says under an attempt's output that was cut at the limit."""
    return logs.truncation_marker(attempt).strip()
