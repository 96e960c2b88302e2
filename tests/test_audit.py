"""The audit log (tasks_app.audit): every change and login leaves exactly one entry.

Each action is sent once through the dashboard (bob's session) and once
through the API (bob's token) from an address of its own; the test then
reads the entries made since and expects exactly one, with who, what,
which target, from where and what changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from tasks_app import audit, lifecycle, tokens
from tasks_app.models import ApiToken, AuditEntry, Run, Task
from workers_app.models import EnrollmentToken, Worker

pytestmark = pytest.mark.django_db

ADDRESS = "203.0.113.7"


def _log_in(client: Client, username: str, password: str) -> Client:
    """Through the login page: force_login's request has no address, which
    django-axes cannot store on PostgreSQL (its GenericIPAddressField)."""
    response = client.post(reverse("login"), {"username": username, "password": password})
    assert response.status_code == 302
    return client


@pytest.fixture
def bob_client(client, bob):
    return _log_in(client, "bob", "bob-pass-123")


@dataclass(frozen=True)
class Action:
    action: str
    url: str  # a URL name
    args: tuple[str, ...] = ()  # names of objects of the world
    data: dict[str, Any] = field(default_factory=dict)
    method: str = "post"
    target: str = ""  # the expected target text, formatted with the world
    changes: Callable[[dict], dict] | None = None  # world -> expected changes


def _world(task, worker) -> dict:
    queued = lifecycle.trigger_run(task)
    finished = lifecycle.trigger_run(task)
    Run.objects.filter(pk=finished.pk).update(status=Run.Status.FAILED)
    Worker.objects.filter(pk=worker.pk).update(state=Worker.State.ONLINE)
    pending = Worker.objects.create(
        name="node-2",
        capacity=1,
        requested_capacity=3,
        requested_labels=["gpu"],
        credential_hash=tokens.digest("wkr_pending"),
        state=Worker.State.PENDING,
        approved_at=None,
    )
    _, enrollment = EnrollmentToken.mint(note="spare")
    return {
        "task": task.pk,
        "queued": queued.pk,
        "finished": finished.pk,
        "worker": worker.pk,
        "pending": pending.pk,
        "enrollment": enrollment.pk,
    }


def _new(model, world) -> int:
    return model.objects.order_by("-id").values_list("id", flat=True).first()


DASHBOARD = [
    Action(
        "task.create",
        "tasks:create",
        data={"name": "made", "command": "true"},
        target="task {new_task} (made)",
    ),
    Action(
        "task.update",
        "tasks:edit",
        ("task",),
        {"name": "renamed", "command": 'python3 -c "print(6*7)"', "enabled": "on"},
        target="task {task} (renamed)",
        changes=lambda w: {"name": ["answer", "renamed"]},
    ),
    Action("task.delete", "tasks:delete", ("task",), target="task {task} (answer)"),
    Action(
        "run.trigger",
        "tasks:run",
        ("task",),
        target="task {task} (answer)",
        changes=lambda w: {"runs": [w["new_run"]]},
    ),
    Action(
        "task.schedule_pause",
        "tasks:schedule-pause",
        ("task",),
        target="task {task} (answer)",
        changes=lambda w: {"schedule_paused": [False, True]},
    ),
    Action(
        "task.schedule_resume",
        "tasks:schedule-resume",
        ("task",),
        target="task {task} (answer)",
        changes=lambda w: {"schedule_paused": [False, False]},
    ),
    Action("run.cancel", "tasks:run-cancel", ("queued",), target="run {queued} (answer)"),
    Action(
        "run.retry",
        "tasks:run-retry",
        ("finished",),
        target="run {finished} (answer)",
        changes=lambda w: {"retry": w["new_run"]},
    ),
    Action("scheduler.pause", "tasks:pause", target="scheduler"),
    Action("scheduler.resume", "tasks:resume", target="scheduler"),
    Action(
        "worker.drain",
        "workers:state",
        ("worker", "drain"),
        target="worker {worker} (node-1)",
        changes=lambda w: {"state": ["online", "draining"]},
    ),
    Action(
        "worker.disable",
        "workers:state",
        ("worker", "disable"),
        target="worker {worker} (node-1)",
        changes=lambda w: {"state": ["online", "disabled"]},
    ),
    Action("worker.revoke", "workers:revoke", ("worker",), target="worker {worker} (node-1)"),
    Action(
        "enrollment_token.create",
        "workers:add",
        target="enrollment token {new_enrollment} (dashboard, by bob)",
    ),
    Action(
        "worker.approve",
        "workers:approve",
        ("pending",),
        {"labels": "gpu, linux", "capacity": "2"},
        target="worker {pending} (node-2)",
        changes=lambda w: {
            "state": ["pending", "approved"],
            "labels": ["gpu", "linux"],
            "capacity": 2,
        },
    ),
    Action(
        "worker.allow_reenroll",
        "workers:allow-reenroll",
        ("worker",),
        target="worker {worker} (node-1)",
    ),
    Action(
        "enrollment_token.create",
        "workers:token-mint",
        data={"note": "rack 4", "max_uses": "3", "ttl_hours": "2"},
        target="enrollment token {new_enrollment} (rack 4)",
        changes=lambda w: {
            "expires_at": EnrollmentToken.objects.get(
                pk=w["new_enrollment"]
            ).expires_at.isoformat(),
            "max_uses": 3,
            "auto_approve": False,
        },
    ),
    Action(
        "enrollment_token.revoke",
        "workers:token-revoke",
        ("enrollment",),
        target="enrollment token {enrollment} (spare)",
    ),
    Action(
        "token.create",
        "tokens",
        data={"name": "laptop", "expires_in_days": "0"},
        target="token {new_token} (laptop)",
        changes=lambda w: {"user": "bob", "name": "laptop", "expires_at": None},
    ),
]

API = [
    Action(
        "task.create",
        "api:tasks",
        data={"name": "made", "command": "true"},
        target="task {new_task} (made)",
    ),
    Action(
        "task.update",
        "api:task",
        ("task",),
        {"timeout": 30},
        method="patch",
        target="task {task} (answer)",
        changes=lambda w: {"timeout": [None, 30]},
    ),
    Action("task.delete", "api:task", ("task",), method="delete", target="task {task} (answer)"),
    Action(
        "run.trigger",
        "api:task-run",
        ("task",),
        target="task {task} (answer)",
        changes=lambda w: {"runs": [w["new_run"]]},
    ),
    Action(
        "run.trigger",
        "api:runs",
        data={"task": "{task}", "count": 2},
        target="task {task} (answer)",
        changes=lambda w: {"runs": [w["new_run"] - 1, w["new_run"]]},
    ),
    Action("run.cancel", "api:run-cancel", ("queued",), target="run {queued} (answer)"),
    Action(
        "run.retry",
        "api:run-retry",
        ("finished",),
        target="run {finished} (answer)",
        changes=lambda w: {"retry": w["new_run"]},
    ),
    Action("scheduler.pause", "api:scheduler-pause", target="scheduler"),
    Action("scheduler.resume", "api:scheduler-resume", target="scheduler"),
    Action(
        "worker.drain",
        "api:worker-action",
        ("worker", "drain"),
        target="worker {worker} (node-1)",
        changes=lambda w: {"state": ["online", "draining"]},
    ),
    Action(
        "worker.approve",
        "api:worker-approve",
        ("pending",),
        target="worker {pending} (node-2)",
        # The agent's request, when the admin gives none.
        changes=lambda w: {"state": ["pending", "approved"], "labels": ["gpu"], "capacity": 3},
    ),
    Action(
        "worker.enable",
        "api:worker-action",
        ("worker", "enable"),
        target="worker {worker} (node-1)",
        # Online once its socket is up: it has none here.
        changes=lambda w: {"state": ["online", "offline"]},
    ),
]


def _url(action: Action, world: dict) -> str:
    args = [world.get(a, a) for a in action.args]
    return reverse(action.url, args=args)


def _only_entry_since(mark: int) -> AuditEntry:
    entries = list(AuditEntry.objects.filter(pk__gt=mark))
    assert len(entries) == 1, [(e.action, e.target) for e in entries]
    return entries[0]


def _mark() -> int:
    return AuditEntry.objects.order_by("-id").values_list("id", flat=True).first() or 0


def _expect(entry: AuditEntry, action: Action, world: dict, actor: str) -> None:
    world = {
        **world,
        "new_task": _new(Task, world),
        "new_run": _new(Run, world),
        "new_token": _new(ApiToken, world),
        "new_enrollment": _new(EnrollmentToken, world),
    }
    assert (entry.actor, entry.action, entry.target, entry.address) == (
        actor,
        action.action,
        action.target.format(**world),
        ADDRESS,
    )
    if action.changes is not None:
        assert entry.changes == action.changes(world)


@pytest.mark.parametrize("action", DASHBOARD, ids=lambda a: f"{a.action}-{a.url}")
def test_each_dashboard_action_leaves_exactly_one_entry(bob_client, bob, task, worker, action):
    world = _world(task, worker)
    mark = _mark()

    response = bob_client.post(_url(action, world), action.data, REMOTE_ADDR=ADDRESS)

    assert response.status_code in (200, 302), response.content[:500]
    entry = _only_entry_since(mark)
    _expect(entry, action, world, actor="bob")
    assert (entry.actor_user_id, entry.token_id) == (bob.pk, None)


@pytest.mark.parametrize("action", API, ids=lambda a: f"{a.action}-{a.url}")
def test_each_api_action_leaves_exactly_one_entry(api, bob, task, worker, action):
    world = _world(task, worker)
    mark = _mark()
    data = {
        k: int(v.format(**world)) if str(v).startswith("{") else v for k, v in action.data.items()
    }

    send = getattr(api, action.method)
    response = send(
        _url(action, world), json.dumps(data), content_type="application/json", REMOTE_ADDR=ADDRESS
    )

    assert response.status_code in (200, 201, 204), response.content[:500]
    entry = _only_entry_since(mark)
    _expect(entry, action, world, actor="bob (token tests)")
    token = ApiToken.objects.get(user=bob, name="tests")
    assert (entry.actor_user_id, entry.token_id) == (bob.pk, token.pk)


def test_a_refused_or_failed_action_leaves_no_entry(api, otto, task):
    viewer = _log_in(Client(), "otto", "otto-pass-123")
    mark = _mark()

    assert viewer.post(reverse("tasks:pause")).status_code == 403
    response = api.post(
        reverse("api:tasks"), json.dumps({"name": "answer"}), content_type="application/json"
    )
    assert response.status_code == 400

    assert not AuditEntry.objects.filter(pk__gt=mark).exists()


@pytest.mark.django_db(transaction=True)
def test_the_trigger_consumer_records_each_request_in_its_batch(bob_token, task):
    from channels.testing import HttpCommunicator

    from scheduler_site.asgi import application
    from tests.engines import in_own_loop

    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {bob_token}".encode()),
    ]
    body = json.dumps({"task": task.pk, "count": 3}).encode()

    async def send():
        communicator = HttpCommunicator(application, "POST", "/api/runs", body, headers)
        communicator.scope["client"] = (ADDRESS, 40000)
        return await communicator.get_response(timeout=10)

    mark = _mark()
    response = in_own_loop(send)

    assert response["status"] == 201
    body = json.loads(response["body"])
    entry = _only_entry_since(mark)
    assert (entry.actor, entry.action, entry.target) == (
        "bob (token tests)",
        "run.trigger",
        f"task {task.pk} (answer)",
    )
    assert entry.changes == {"runs": [run["id"] for run in body["results"]]}
    assert entry.address == ADDRESS


def test_an_agent_enrolling_is_recorded_with_its_enrollment_token(client):
    raw, token = EnrollmentToken.mint(note="rack 4")
    mark = _mark()

    response = client.post(
        reverse("api:worker-register"),
        json.dumps({"token": raw, "name": "node-9", "capacity": 2, "labels": ["gpu"]}),
        content_type="application/json",
        REMOTE_ADDR=ADDRESS,
    )

    assert response.status_code == 201
    entry = _only_entry_since(mark)
    worker = Worker.objects.get(name="node-9")
    assert (entry.actor, entry.action, entry.target, entry.address) == (
        f"enrollment token {token.pk}",
        "worker.enroll",
        f"worker {worker.pk} (node-9)",
        ADDRESS,
    )
    assert entry.changes == {"hostname": "", "capacity": 2, "labels": ["gpu"], "state": "pending"}


def test_revoking_a_token_is_recorded_once(bob_client, bob):
    _, token = ApiToken.mint(bob, name="old")
    mark = _mark()

    url = reverse("token-revoke", args=[token.pk])
    bob_client.post(url, REMOTE_ADDR=ADDRESS)
    bob_client.post(url, REMOTE_ADDR=ADDRESS)  # a double click

    entry = _only_entry_since(mark)
    assert (entry.actor, entry.action, entry.target) == (
        "bob",
        "token.revoke",
        f"token {token.pk} (old)",
    )


def test_logins_failed_logins_and_logouts_are_recorded(bob):
    browser = Client(REMOTE_ADDR=ADDRESS)
    mark = _mark()

    browser.post(reverse("login"), {"username": "bob", "password": "wrong-one"})
    browser.post(reverse("login"), {"username": "bob", "password": "bob-pass-123"})
    browser.post(reverse("logout"))

    entries = AuditEntry.objects.filter(pk__gt=mark).order_by("id")
    assert [(e.actor, e.action, e.target, e.address, e.actor_user_id) for e in entries] == [
        ("bob", "login.failed", "user bob", ADDRESS, None),
        ("bob", "login", f"user {bob.pk} (bob)", ADDRESS, bob.pk),
        ("bob", "logout", f"user {bob.pk} (bob)", ADDRESS, bob.pk),
    ]
    assert "wrong-one" not in json.dumps([e.changes for e in entries])


def test_secret_values_never_reach_the_log(api):
    url = reverse("api:tasks")
    body = {"name": "deploy", "command": "true", "secret_env": {"API_KEY": "hunter2-value"}}
    created = api.post(url, json.dumps(body), content_type="application/json").json()
    detail = reverse("api:task", args=[created["id"]])
    api.patch(
        detail,
        json.dumps({"secret_env": {"API_KEY": "new-hunter3", "DB_PASS": "pw-hunter4"}}),
        content_type="application/json",
    )

    create, update = AuditEntry.objects.filter(action__startswith="task.").order_by("id")
    assert create.changes["secret_env"] == {"added": ["API_KEY"]}
    assert update.changes == {"secret_env": {"added": ["DB_PASS"], "changed": ["API_KEY"]}}
    logged = json.dumps([e.changes for e in AuditEntry.objects.all()])
    assert "hunter" not in logged


def test_commands_record_users_and_tokens_as_manage_py(tmp_path, bob):
    password = tmp_path / "pw"
    password.write_text("a-long-enough-password-42\n")
    mark = _mark()

    call_command("createuser", "carol", "--role", "viewer", "--password-file", str(password))
    call_command("createuser", "carol", "--role", "operator", "--update")
    call_command("apitoken", "carol", "--name", "ci", stdout=open("/dev/null", "w"))  # noqa: SIM115

    entries = list(AuditEntry.objects.filter(pk__gt=mark).order_by("id"))
    carol = bob.__class__.objects.get(username="carol")
    token = ApiToken.objects.get(user=carol)
    assert [(e.actor, e.action, e.target, e.changes) for e in entries] == [
        (
            "manage.py",
            "user.create",
            f"user {carol.pk} (carol)",
            {"role": [None, "viewer"], "password": "set"},
        ),
        ("manage.py", "user.update", f"user {carol.pk} (carol)", {"role": ["viewer", "operator"]}),
        (
            "manage.py",
            "token.create",
            f"token {token.pk} (ci)",
            {"user": "carol", "name": "ci", "expires_at": None},
        ),
    ]


def test_a_role_change_in_django_admin_is_one_entry(bob_client, otto):
    from django.contrib.auth.models import Group

    admin_group = Group.objects.get(name="admin")
    url = reverse("admin:auth_user_change", args=[otto.pk])
    form = {
        "username": "otto",
        "email": otto.email,
        "is_active": "on",
        "groups": [admin_group.pk],
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2026-01-01",
        "initial-date_joined_1": "00:00:00",
    }
    mark = _mark()

    response = bob_client.post(url, form, REMOTE_ADDR=ADDRESS)

    assert response.status_code == 302, response.content[:2000]
    entry = _only_entry_since(mark)
    assert (entry.actor, entry.action, entry.target, entry.address) == (
        "bob",
        "user.update",
        f"user {otto.pk} (otto)",
        ADDRESS,
    )
    assert entry.changes["role"] == ["operator", "admin"]
    assert "Groups" in entry.changes["fields"]


def test_deleting_in_django_admin_is_recorded(bob_client, task):
    mark = _mark()

    response = bob_client.post(
        reverse("admin:tasks_app_task_delete", args=[task.pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    entry = _only_entry_since(mark)
    assert (entry.action, entry.target) == ("task.delete", f"task {task.pk} (answer)")


def test_entries_are_never_edited_or_deleted():
    entry = audit.record_as("manage.py", "scheduler.pause", audit.SCHEDULER)

    entry.actor = "someone else"
    with pytest.raises(AuditEntry.Immutable):
        entry.save()
    with pytest.raises(AuditEntry.Immutable):
        AuditEntry.objects.filter(pk=entry.pk).update(actor="someone else")
    with pytest.raises(AuditEntry.Immutable):
        AuditEntry.objects.filter(pk=entry.pk).delete()
    with pytest.raises(AuditEntry.Immutable):
        entry.delete()

    entry.refresh_from_db()
    assert entry.actor == "manage.py"


def test_deleting_a_user_leaves_their_entries_as_written(django_user_model):
    gone = django_user_model.objects.create_user("gone", password="x-long-password-1")
    _log_in(Client(), "gone", "x-long-password-1")
    entry = AuditEntry.objects.get(action="login", actor="gone")
    pk = gone.pk

    gone.delete()

    entry.refresh_from_db()
    assert (entry.actor, entry.actor_user_id, entry.target) == ("gone", pk, f"user {pk} (gone)")


@pytest.fixture
def log(bob):
    """Six entries, oldest first: two days of a small team."""
    import datetime as dt

    from django.utils import timezone

    rows = [
        ("alice", "task.create", ("task", 1, "task 1 (nightly)"), "2026-03-01T09:00:00+00:00"),
        ("bob", "task.update", ("task", 1, "task 1 (nightly)"), "2026-03-01T10:00:00+00:00"),
        ("bob", "run.trigger", ("task", 1, "task 1 (nightly)"), "2026-03-01T23:59:00+00:00"),
        ("alice", "worker.drain", ("worker", 3, "worker 3 (node-3)"), "2026-03-02T08:00:00+00:00"),
        (
            "bob (token ci)",
            "run.trigger",
            ("task", 2, "task 2 (backup)"),
            "2026-03-02T09:00:00+00:00",
        ),
        ("carol", "login.failed", ("user", "", "user carol"), "2026-03-02T10:00:00+00:00"),
    ]
    made = []
    for actor, action, target, at in rows:
        entry = audit.entry(actor, None, None, "192.0.2.1", action, target)
        entry.at = dt.datetime.fromisoformat(at)
        entry.save()
        made.append(entry.pk)
    assert timezone.is_aware(entry.at)
    return made


def _api_actions(client, query: str) -> list[tuple[str, str]]:
    response = client.get(f"/api/audit?{query}")
    assert response.status_code == 200, response.json()
    return [(e["actor"], e["action"]) for e in response.json()["results"]]


def test_the_api_filters_the_log_newest_first(api, log):
    assert _api_actions(api, "actor=bob") == [
        ("bob (token ci)", "run.trigger"),
        ("bob", "run.trigger"),
        ("bob", "task.update"),
    ]
    assert _api_actions(api, "action=run.trigger&since=2026-03-02") == [
        ("bob (token ci)", "run.trigger")
    ]
    assert _api_actions(api, "action=task") == [("bob", "task.update"), ("alice", "task.create")]
    assert _api_actions(api, "target=nightly&until=2026-03-01") == [
        ("bob", "run.trigger"),
        ("bob", "task.update"),
        ("alice", "task.create"),
    ]
    assert _api_actions(api, "since=2026-03-01T10:00:00%2B00:00&until=2026-03-02T08:00:00Z") == [
        ("bob", "run.trigger"),
        ("bob", "task.update"),
    ]


def test_the_api_pages_the_log_by_id(api, log):
    seen, url = [], "/api/audit?limit=4"
    while url:
        body = api.get(url).json()
        assert set(body["results"][0]) == {
            "id",
            "actor",
            "action",
            "target",
            "at",
            "address",
            "changes",
        }
        seen += [e["id"] for e in body["results"]]
        url = body["next"]
    # The fixture's, and bob's own token use is not a change: nothing else.
    assert seen == sorted(log, reverse=True)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("before=abc", "before must be a positive whole number, not 'abc'"),
        ("since=yesterday", "since must be a date (2026-01-31) or a time with its offset"),
        (
            "until=2026-03-01T10:00:00",
            "until must be a date (2026-01-31) or a time with its offset",
        ),
        ("action=DROP TABLE", "action must be an action (task.update) or a kind (task)"),
        ("until=9999-12-31", "until must be a date (2026-01-31) or a time"),
        ("since=0001-01-01T00:00:00%2B14:00", "since must be a date (2026-01-31) or a time"),
        ("actor=" + "x" * 201, "actor must be at most 200 characters"),
        ("limit=0", "limit must be between 1 and"),
    ],
)
def test_the_api_refuses_bad_filters(api, query, message):
    response = api.get(f"/api/audit?{query}")

    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


def test_the_audit_page_shows_filtered_entries_to_admins(bob_client, log):
    response = bob_client.get(reverse("tasks:audit"), {"actor": "alice", "action": "worker"})

    assert response.status_code == 200
    html = response.content.decode()
    assert "worker 3 (node-3)" in html
    assert "task 1 (nightly)" not in html
    assert 'href="/audit/"' in html  # the nav link, for admins


def test_the_audit_page_pages_newest_first(bob_client, log, settings):
    settings.SCHEDULER_PAGE_SIZE = 3
    first = bob_client.get(reverse("tasks:audit"), {"target": "task"})
    older = first.context["older_url"]

    second = bob_client.get(older)

    assert [e.pk for e in first.context["page"].entries] == [log[4], log[2], log[1]]
    assert [e.pk for e in second.context["page"].entries] == [log[0]]
    assert older == f"/audit/?target=task&before={log[1]}"
    assert second.context["older_url"] is None


def test_operators_see_no_audit_link(client, otto):
    _log_in(client, "otto", "otto-pass-123")

    html = client.get(reverse("tasks:list")).content.decode()

    assert 'href="/audit/"' not in html
