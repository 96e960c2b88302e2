"""The browser's live socket, through the real ASGI app (origin check, session
auth) and the real consumer, views and database: who may open it, what an
event re-renders, and the output lines a run page gets."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import transaction
from django.test import Client

from scheduler_site.asgi import application
from tasks_app import events, lifecycle, logs
from tasks_app.models import Attempt, Run, Task
from workers_app.models import Worker

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5
RUNS = {"id": "run-table", "src": "/runs/", "on": "runs attempts"}
WORKERS = {"id": "worker-table", "src": "/workers/", "on": "workers"}


def _cookie_of(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def open_socket(user=None, origin: bytes = b"http://localhost"):
    headers = [(b"host", b"localhost")]
    if origin:
        headers.append((b"origin", origin))
    if user is not None:
        cookie = await database_sync_to_async(_cookie_of)(user)
        headers.append((b"cookie", cookie.encode()))
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, code = await communicator.connect(timeout=TIMEOUT)
    return communicator, connected, code


def watch(regions, *, run=None, output=None, since=None) -> dict:
    return {
        "type": "watch",
        "regions": regions,
        "page": "http://localhost/runs/",
        "run": run,
        "output": output or {},
        "since": since,
    }


@database_sync_to_async
def new_run(task: Task) -> Run:
    """A run, with the run.queued event lifecycle records in its transaction."""
    return lifecycle.trigger_run(task)


@database_sync_to_async
def record(kind: str, **ids) -> int:
    with transaction.atomic():
        events.record(kind, **ids)
    return events.last_id()


@database_sync_to_async
def running_attempt(task: Task, worker: Worker) -> Attempt:
    attempt = lifecycle.trigger_run(task).attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, 1234)
    return attempt


@database_sync_to_async
def store(worker: Worker, attempt: Attempt, *chunks: tuple[int, str, str]) -> None:
    logs.append_logs([logs.Chunk(worker.pk, attempt.pk, *chunk) for chunk in chunks])


# --- who may open it -----------------------------------------------------------------


async def test_it_refuses_an_anonymous_socket():
    communicator, connected, code = await open_socket(None)
    assert (connected, code) == (False, 4403)


async def test_it_refuses_a_user_without_a_role(oscar):
    communicator, connected, code = await open_socket(oscar)
    assert (connected, code) == (False, 4403)


async def test_it_refuses_a_page_of_another_site_even_with_the_users_cookie(vera):
    communicator, connected, code = await open_socket(vera, origin=b"http://evil.example")
    assert connected is False


async def test_it_refuses_a_socket_without_an_origin(vera):
    communicator, connected, code = await open_socket(vera, origin=b"")
    assert connected is False


async def test_the_agent_path_still_refuses_a_browser():
    headers = [(b"origin", b"http://localhost"), (b"authorization", b"Bearer wkr_x")]
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected is False


# --- regions ----------------------------------------------------------------------


async def test_a_viewer_gets_a_watched_region_re_rendered_after_its_event_commits(vera, task):
    communicator, connected, _ = await open_socket(vera)
    assert connected
    await communicator.send_json_to(watch([RUNS]))
    await communicator.receive_nothing(0.3)

    run = await new_run(task)

    frame = await communicator.receive_json_from(TIMEOUT)
    assert (frame["type"], frame["id"]) == ("html", "run-table")
    assert frame["html"].lstrip().startswith('<div id="run-table" data-live-src="/runs/"')
    assert f'href="/runs/{run.pk}/"' in frame["html"]
    assert frame["last_id"] == await database_sync_to_async(events.last_id)()
    # The viewer's own render: no operator buttons.
    assert await communicator.receive_nothing(0.5)
    await communicator.disconnect()


async def test_it_does_not_render_a_region_for_an_unrelated_topic(vera, task):
    communicator, connected, _ = await open_socket(vera)
    assert connected
    await communicator.send_json_to(watch([WORKERS]))
    await new_run(task)
    await record(events.TASK_CHANGED, task_id=task.pk)
    assert await communicator.receive_nothing(0.6)
    await communicator.disconnect()


async def test_a_run_region_follows_its_own_run_only(vera, task):
    mine, other = await new_run(task), await new_run(task)
    region = {"id": "run-live", "src": f"/runs/{mine.pk}/", "on": f"run:{mine.pk}"}
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([region], run=mine.pk))

    await record(events.RUN_STARTED, run_id=other.pk)
    assert await communicator.receive_nothing(0.5)

    await database_sync_to_async(lambda: lifecycle.cancel_run(mine, by="bob"))()
    frame = await communicator.receive_json_from(TIMEOUT)
    assert frame["id"] == "run-live"
    assert 'id="run-cancelled"' in frame["html"]
    assert await communicator.receive_nothing(0.5)
    await communicator.disconnect()


async def test_many_events_are_one_render_per_region(vera, task):
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([RUNS]))
    for _ in range(10):
        await new_run(task)
    frames = [await communicator.receive_json_from(TIMEOUT)]
    while not await communicator.receive_nothing(0.6):
        frames.append(await communicator.receive_json_from(TIMEOUT))
    # The first event renders at once, the rest are coalesced into passes 200 ms apart.
    assert 1 <= len(frames) <= 3, len(frames)
    runs = await database_sync_to_async(lambda: list(Run.objects.values_list("pk", flat=True)))()
    assert all(f'href="/runs/{pk}/"' in frames[-1]["html"] for pk in runs)


async def test_it_answers_a_bad_region_with_an_error_and_renders_nothing(vera, task):
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([{"id": "x", "src": "/api/tasks", "on": "runs"}]))
    assert await communicator.receive_json_from(TIMEOUT) == {
        "type": "error",
        "message": "region x: /api/tasks is not a dashboard page",
    }
    await communicator.send_json_to(watch([{"id": "x", "src": "/runs/", "on": "everything"}]))
    assert await communicator.receive_json_from(TIMEOUT) == {
        "type": "error",
        "message": "region x: unknown topic(s) ['everything']",
    }
    await communicator.send_to(text_data="not json")
    assert await communicator.receive_json_from(TIMEOUT) == {
        "type": "error",
        "message": "a frame is not JSON",
    }
    assert (await communicator.receive_output(TIMEOUT))["code"] == 4400


# --- catch-up ------------------------------------------------------------------------


async def test_a_reconnecting_page_catches_up_on_what_it_missed_and_only_that(vera, task):
    since = await record(events.TASK_CHANGED, task_id=task.pk)
    first, connected, _ = await open_socket(vera)
    await first.send_json_to(watch([RUNS, WORKERS], since=since))
    assert await first.receive_nothing(0.5)
    await first.disconnect()

    run = await new_run(task)  # while no socket is open

    second, connected, _ = await open_socket(vera)
    await second.send_json_to(watch([RUNS, WORKERS], since=since))
    frame = await second.receive_json_from(TIMEOUT)
    assert frame["id"] == "run-table"
    assert f'href="/runs/{run.pk}/"' in frame["html"]
    assert await second.receive_nothing(0.5)  # the workers region saw nothing to catch up
    await second.disconnect()

    third, connected, _ = await open_socket(vera)
    await third.send_json_to(watch([RUNS], since=frame["last_id"]))
    assert await third.receive_nothing(0.5)
    await third.disconnect()


# --- output -----------------------------------------------------------------------


async def test_a_run_page_gets_the_output_lines_after_its_cursor_as_they_are_stored(
    vera, task, worker
):
    attempt = await running_attempt(task, worker)
    await store(worker, attempt, (0, "stdout", "line 1\n"), (1, "stderr", "warn\n"))
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([], run=attempt.run_id, output={str(attempt.pk): 1}))
    # The page had seq 0 (it came with the page) but gave no renderer state:
    # the server rebuilds it (one line so far), and sends seq 1 alone, as markup.
    frame = await communicator.receive_json_from(TIMEOUT)
    assert frame == {
        "type": "output",
        "attempt": attempt.pk,
        "seq": 1,
        "html": '<span class="line" data-stream="stderr" data-n="2">warn</span>',
        "tail": "",
        "state": {
            "lines": 2,
            "streams": {
                "stdout": {"pending": "", "style": {}},
                "stderr": {"pending": "", "style": {}},
            },
        },
    }
    assert await communicator.receive_nothing(0.3)

    await store(worker, attempt, (2, "stdout", "line 2\n"), (3, "stdout", "line 3\nhal"))
    html, tail, seq = "", "", None
    while seq != 3:
        frame = await communicator.receive_json_from(TIMEOUT)
        html, tail, seq = html + frame["html"], frame["tail"], frame["seq"]
    assert html == (
        '<span class="line" data-stream="stdout" data-n="3">line 2</span>'
        '<span class="line" data-stream="stdout" data-n="4">line 3</span>'
    )
    # The unfinished line comes as the tail, which the page replaces as it grows.
    assert tail == '<span class="line partial" data-stream="stdout" data-n="5">hal</span>'
    assert await communicator.receive_nothing(0.5)
    await communicator.disconnect()


async def test_a_page_gives_back_its_renderer_state_and_lines_go_on_from_it(vera, task, worker):
    attempt = await running_attempt(task, worker)
    await store(
        worker, attempt, (0, "stdout", "x\n"), (1, "stdout", "y\n"), (2, "stdout", "tial\n")
    )
    communicator, connected, _ = await open_socket(vera)
    # Red, five lines shown and "par" unfinished: as the page's box says (data-state).
    state = {"lines": 5, "streams": {"stdout": {"pending": "par", "style": {"fg": 1}}}}
    await communicator.send_json_to(
        watch([], run=attempt.run_id, output={str(attempt.pk): 2})
        | {"states": {str(attempt.pk): state}}
    )
    frame = await communicator.receive_json_from(TIMEOUT)
    assert frame["seq"] == 2
    assert frame["html"] == (
        '<span class="line" data-stream="stdout" data-n="6">'
        '<span class="ansi-fg-1">partial</span></span>'
    )
    # A state that is not one (markup in a colour) is refused, and changes nothing.
    bad = {"lines": 1, "streams": {"stdout": {"pending": "", "style": {"fg": '"><script>'}}}}
    await communicator.send_json_to(
        {"type": "cursors", "output": {str(attempt.pk): 3}, "states": {str(attempt.pk): bad}}
    )
    error = await communicator.receive_json_from(TIMEOUT)
    assert error == {"type": "error", "message": "states: a style's fg is 0-15 or #rrggbb"}
    await communicator.disconnect()


async def test_output_of_another_run_is_not_sent(vera, task, worker):
    mine = await running_attempt(task, worker)
    other = await running_attempt(task, worker)
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([], run=mine.run_id, output={str(mine.pk): 0}))
    await store(worker, other, (0, "stdout", "not yours\n"))
    assert await communicator.receive_nothing(0.6)
    # Nor when the page names the other run's attempt under its own run.
    await communicator.send_json_to({"type": "cursors", "output": {str(other.pk): 0}})
    assert await communicator.receive_nothing(0.6)
    await communicator.disconnect()


async def test_a_new_output_box_asks_for_its_lines_from_its_cursor(vera, task, worker):
    attempt = await running_attempt(task, worker)
    await store(worker, attempt, (0, "stdout", "a\n"), (1, "stdout", "b\n"))
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([], run=attempt.run_id))
    assert await communicator.receive_nothing(0.3)
    await communicator.send_json_to({"type": "cursors", "output": {str(attempt.pk): 0}})
    frame = await communicator.receive_json_from(TIMEOUT)
    assert (frame["seq"], frame["html"]) == (
        1,
        '<span class="line" data-stream="stdout" data-n="1">a</span>'
        '<span class="line" data-stream="stdout" data-n="2">b</span>',
    )
    assert await communicator.receive_nothing(0.3)
    await communicator.disconnect()


# --- the top of every page ------------------------------------------------------------


@pytest.mark.django_db(transaction=False)
def test_the_scheduler_state_partials_follow_pausing_and_refuse_bad_parts(client, vera, bob):
    from tasks_app.models import SchedulerState

    client.force_login(vera)
    html = client.get("/scheduler/state/", headers={"HX-Request": "true"}).content.decode()
    assert html.strip() == (
        '<div id="scheduler-banner" data-live-src="/scheduler/state/"'
        ' data-live-on="scheduler">\n  \n  </div>'
    )
    SchedulerState.set_paused(True, by="bob")
    html = client.get("/scheduler/state/").content.decode()
    assert 'data-live-on="scheduler runs">' in html
    assert "Scheduler paused by bob" in html
    # The switch is the admin's.
    assert client.get("/scheduler/state/?part=switch").status_code == 403
    bad = client.get("/scheduler/state/?part=nope")
    assert (bad.status_code, bad.content) == (400, b"Unknown part 'nope': one of banner, switch.")

    client.force_login(bob)
    page = "http://testserver/runs/?status=failed"
    html = client.get(
        "/scheduler/state/?part=switch", headers={"HX-Request": "true", "HX-Current-URL": page}
    ).content.decode()
    assert 'id="resume-scheduler"' in html
    # After a click, back to the page the switch is on, not to this partial.
    assert '<input type="hidden" name="next" value="/runs/?status=failed">' in html


async def test_a_live_rendered_form_carries_a_csrf_token_that_the_server_accepts(bob):
    """The socket's render uses the browser's CSRF cookie: a form in a re-rendered
    region posts like one from the page load (else every button in it is a 403)."""

    from django.middleware.csrf import _get_new_csrf_string

    from tasks_app.models import SchedulerState

    secret = _get_new_csrf_string()
    session = await database_sync_to_async(_cookie_of)(bob)
    headers = [
        (b"host", b"localhost"),
        (b"origin", b"http://localhost"),
        (b"cookie", f"{session}; {settings.CSRF_COOKIE_NAME}={secret}".encode()),
    ]
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    assert (await communicator.connect(TIMEOUT))[0]
    switch = {"id": "scheduler-switch", "src": "/scheduler/state/?part=switch", "on": "scheduler"}
    await communicator.send_json_to(watch([switch]))

    # set_paused records scheduler.paused in its transaction.
    await database_sync_to_async(SchedulerState.set_paused)(True, by="bob")
    frame = await communicator.receive_json_from(TIMEOUT)
    assert frame["id"] == "scheduler-switch"
    assert '<input type="hidden" name="next" value="/runs/">' in frame["html"]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', frame["html"]).group(1)
    await communicator.disconnect()

    @database_sync_to_async
    def resume_with(token: str):
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(bob)
        browser.cookies[settings.CSRF_COOKIE_NAME] = secret
        return browser.post("/scheduler/resume/", {"csrfmiddlewaretoken": token, "next": "/"})

    assert (await resume_with("x" * 64)).status_code == 403
    assert (await resume_with(token)).status_code == 302
    assert not await database_sync_to_async(SchedulerState.is_paused)()


async def test_every_pages_banner_shows_a_pause_by_someone_else(vera):
    from tasks_app.models import SchedulerState

    communicator, connected, _ = await open_socket(vera)
    banner = {"id": "scheduler-banner", "src": "/scheduler/state/", "on": "scheduler"}
    await communicator.send_json_to(watch([banner]))
    await database_sync_to_async(SchedulerState.set_paused)(True, by="bob")
    frame = await communicator.receive_json_from(TIMEOUT)
    assert frame["id"] == "scheduler-banner"
    assert "Scheduler paused by bob" in frame["html"]
    assert "0 runs still running." in " ".join(frame["html"].split())
    assert await communicator.receive_nothing(0.5)
    await communicator.disconnect()


async def test_the_run_pages_timeline_gets_each_new_event_of_its_run(vera, task, worker):
    run = await new_run(task)
    region = {"id": "run-live", "src": f"/runs/{run.pk}/", "on": f"run:{run.pk}"}
    communicator, connected, _ = await open_socket(vera)
    await communicator.send_json_to(watch([region], run=run.pk))

    @database_sync_to_async
    def assign():
        attempt = run.attempts.get()
        assert lifecycle.assign(attempt.pk, worker.pk, worker.name)

    await assign()
    frame = await communicator.receive_json_from(TIMEOUT)
    # The timeline is part of the run's live region: re-rendered with it.
    timeline = frame["html"][frame["html"].index('<section class="card" id="timeline">') :]
    kinds = re.findall(r'data-kind="([a-z._]+)"', timeline.split("</section>")[0])
    assert kinds == ["run.queued", "attempt.assigned"]
    await communicator.disconnect()
