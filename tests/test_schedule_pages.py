"""Schedules through the form, the API and the task page: bad input refused
field by field, next runs shown in the task's zone, the schedule's own pause."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.test import Client
from django.utils.html import escape

from tasks_app import clock
from tasks_app.models import Task

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}
UTC = dt.UTC


def send(api: Client, method: str, url: str, payload: dict):
    return getattr(api, method)(url, json.dumps(payload), content_type="application/json")


def field_errors(html: str, name: str) -> list[str]:
    marker = f'<p class="error field-error" data-field="{name}">'
    return [part.split("</p>")[0] for part in html.split(marker)[1:]]


def test_the_form_refuses_a_bad_expression_and_an_unknown_zone_field_by_field(bob_client):
    response = bob_client.post(
        "/tasks/new/",
        {"name": "x", "command": "true", "schedule": "61 * * * *", "timezone": "Mars/Base"},
        headers=HTMX,
    )

    html = response.content.decode()
    assert field_errors(html, "schedule") == [
        escape("Invalid cron expression '61 * * * *': Bad minute.")
    ]
    assert field_errors(html, "timezone") == [
        escape(
            "Unknown time zone 'Mars/Base': use an IANA name such as UTC, Europe/Berlin "
            "or America/New_York."
        )
    ]
    assert '<fieldset class="schedule" id="schedule-fields">' in html
    assert not Task.objects.exists()


def test_the_form_saves_a_schedule_and_its_next_fire_time(bob_client):
    with clock.frozen(dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)):
        response = bob_client.post(
            "/tasks/new/",
            {
                "name": "nightly",
                "command": "true",
                "schedule": " 30  2 * * * ",
                "timezone": "Europe/Berlin",
                "misfire_policy": "run_once",
                "enabled": "on",
            },
        )
    assert response.status_code == 302
    task = Task.objects.get()
    assert (task.schedule, task.timezone, task.misfire_policy, task.schedule_paused) == (
        "30 2 * * *",
        "Europe/Berlin",
        "run_once",
        False,
    )
    # 02:30 CEST on 2 June.
    assert task.next_fire_at == dt.datetime(2026, 6, 2, 0, 30, tzinfo=UTC)


def test_the_api_refuses_bad_schedule_fields_and_changes_nothing(api, task):
    response = send(
        api,
        "patch",
        f"/api/tasks/{task.pk}",
        {"schedule": "* * * *", "timezone": "Nowhere/City", "misfire_policy": "always"},
    )

    assert response.status_code == 400
    assert response.json()["errors"] == {"misfire_policy": ["Use one of skip, run_once."]}

    response = send(
        api, "patch", f"/api/tasks/{task.pk}", {"schedule": "* * * *", "timezone": "Nowhere/City"}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid task",
        "errors": {
            "schedule": [
                "A cron expression has 5 fields (minute, hour, day of month, month, "
                "day of week); this one has 4."
            ],
            "timezone": [
                "Unknown time zone 'Nowhere/City': use an IANA name such as UTC, "
                "Europe/Berlin or America/New_York."
            ],
        },
    }
    task.refresh_from_db()
    assert (task.schedule, task.timezone, task.next_fire_at) == ("", "UTC", None)


def test_the_api_shows_a_tasks_next_runs_in_its_zone_with_dst_flags(api):
    with clock.frozen(dt.datetime(2026, 10, 24, 12, tzinfo=UTC)):
        response = send(
            api,
            "post",
            "/api/tasks",
            {"name": "b", "command": "true", "schedule": "30 2 * * *", "timezone": "Europe/Berlin"},
        )
        assert response.status_code == 201, response.content
        pk = response.json()["id"]
        body = api.get(f"/api/tasks/{pk}").json()

    assert body["schedule"] == "30 2 * * *"
    assert body["misfire_policy"] == "skip"
    assert body["schedule_paused"] is False
    assert body["next_runs"] == [
        {
            "at": "2026-10-25T02:30:00+02:00",
            "dst": "repeat",
            "note": "02:30: this hour happens twice (clocks go back): it fires once, at the first",
        },
        {"at": "2026-10-26T02:30:00+01:00", "dst": None, "note": ""},
        {"at": "2026-10-27T02:30:00+01:00", "dst": None, "note": ""},
        {"at": "2026-10-28T02:30:00+01:00", "dst": None, "note": ""},
        {"at": "2026-10-29T02:30:00+01:00", "dst": None, "note": ""},
    ]

    # Paused through the API: no next runs, nothing due.
    response = send(api, "patch", f"/api/tasks/{pk}", {"schedule_paused": True})
    assert response.json()["next_runs"] == []
    assert Task.objects.get(pk=pk).next_fire_at is None


def test_the_task_page_shows_the_schedule_and_pauses_and_resumes_it(bob_client):
    with clock.frozen(dt.datetime(2026, 3, 28, 12, tzinfo=UTC)):
        task = Task.objects.create(
            name="spring", command="true", schedule="30 2 * * *", timezone="Europe/Berlin"
        )
        html = bob_client.get(f"/tasks/{task.pk}/").content.decode()

    section = html[html.index('id="task-schedule"') :]
    assert '<code id="schedule-expr">30 2 * * *</code>' in section
    assert "At 02:30" in section
    assert '<dd id="schedule-timezone">Europe/Berlin</dd>' in section
    assert '<dd id="schedule-misfire">Skip missed ticks</dd>' in section
    items = section[section.index('<ol class="next-runs"') : section.index("</ol>")]
    assert items.count("<li>") == 5
    assert "Sun 2026-03-29 03:00 CEST (+02:00)" in items
    assert "02:30 does not exist this day (DST gap): shifted to 03:00" in items
    assert "Mon 2026-03-30 02:30 CEST (+02:00)" in items
    assert ">Pause schedule</button>" in section

    response = bob_client.post(f"/tasks/{task.pk}/schedule/pause/")
    assert response.status_code == 302
    task.refresh_from_db()
    assert (task.schedule_paused, task.next_fire_at, task.enabled) == (True, None, True)
    html = bob_client.get(f"/tasks/{task.pk}/").content.decode()
    assert "none while the schedule is paused" in html
    assert ">Resume schedule</button>" in html

    with clock.frozen(dt.datetime(2026, 4, 1, 12, tzinfo=UTC)):
        bob_client.post(f"/tasks/{task.pk}/schedule/resume/")
    task.refresh_from_db()
    assert task.schedule_paused is False
    assert task.next_fire_at == dt.datetime(2026, 4, 2, 0, 30, tzinfo=UTC)
    assert bob_client.get(f"/tasks/{task.pk}/schedule/pause/").status_code == 405


def test_the_task_list_hints_the_schedule(bob_client):
    Task.objects.create(name="every", command="true", schedule="*/15 * * * *")
    Task.objects.create(name="plain", command="true")
    html = bob_client.get("/tasks/").content.decode()
    assert html.count('class="muted schedule-hint"') == 1
    assert "Every 15th minute of every hour; next " in html


def test_schedule_buttons_need_a_login(client, task):
    response = client.post(f"/tasks/{task.pk}/schedule/pause/")
    assert response.status_code == 302 and "/login" in response["Location"]
    task.refresh_from_db()
    assert task.schedule_paused is False
