"""Who may do what (tasks_app.roles), walked over the whole URL conf.

Every dashboard URL and every API operation has a row in CASES: the role it
needs and a request that works for that role. Each persona (viewer, operator,
admin, outsider) sends each request: at or above the role it works (2xx or a
redirect), below it the answer is 403 (JSON under /api/) and the database is
exactly as before. A URL or API method without a row fails
test_every_url_and_api_method_has_a_rule.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from tasks_app import lifecycle, roles, tokens
from tasks_app.models import ApiToken, Attempt, Run, SchedulerState, Task
from workers_app.models import EnrollmentToken, Worker

pytestmark = pytest.mark.django_db

PUBLIC = "public"


@dataclass(frozen=True)
class Case:
    method: str
    needed: str  # a role, or PUBLIC
    args: tuple[str, ...] = ()  # names of objects of the world, in URL order
    data: dict[str, Any] = field(default_factory=dict)
    json: bool = False  # send `data` as a JSON body (the API)
    extra_args: tuple[Any, ...] = ()


V, OP, A = roles.VIEWER, roles.OPERATOR, roles.ADMIN

# url name -> the requests it serves, each with the role it needs.
CASES: dict[str, list[Case]] = {
    "home": [Case("GET", V)],  # the overview
    "tasks:list": [Case("GET", V)],
    "tasks:create": [
        Case("GET", OP),
        Case("POST", OP, data={"name": "made", "command": "true"}),
    ],
    "tasks:detail": [Case("GET", V, ("task",))],
    "tasks:edit": [
        Case("GET", OP, ("task",)),
        Case("POST", OP, ("task",), data={"name": "renamed", "command": "true"}),
    ],
    "tasks:delete": [Case("GET", OP, ("task",)), Case("POST", OP, ("task",))],
    "tasks:run": [Case("POST", OP, ("task",))],
    "tasks:schedule-pause": [Case("POST", OP, ("task",))],
    "tasks:schedule-resume": [Case("POST", OP, ("task",))],
    "tasks:runs": [Case("GET", V)],
    "tasks:runs-cancel-many": [Case("POST", OP, data={"ids": "queued"})],
    "tasks:runs-retry-many": [Case("POST", OP, data={"ids": "finished"})],
    "tasks:run-detail": [Case("GET", V, ("queued",))],
    "tasks:run-cancel": [Case("POST", OP, ("queued",))],
    "tasks:run-retry": [Case("POST", OP, ("finished",))],
    "tasks:run-result": [Case("GET", V, ("finished",))],
    "tasks:attempt-output": [Case("GET", V, ("finished", "finished_attempt"))],
    "tasks:pause": [Case("POST", A)],
    "tasks:resume": [Case("POST", A)],
    # The banner (the default part); its ?part=switch needs admin: tests/test_live.py.
    "tasks:scheduler-state": [Case("GET", V)],
    "tasks:audit": [Case("GET", A)],
    "workers:list": [Case("GET", V)],
    "workers:add": [Case("POST", A)],
    "workers:revoke": [Case("POST", A, ("worker",))],
    "workers:approve": [Case("POST", A, ("pending",), data={"labels": "linux", "capacity": "2"})],
    "workers:allow-reenroll": [Case("POST", A, ("worker",))],
    "workers:token-mint": [Case("POST", A, data={"max_uses": "1", "note": "roles"})],
    "workers:token-revoke": [Case("POST", A, ("enrollment",))],
    "workers:state": [
        Case("POST", OP, ("worker",), extra_args=("drain",)),
        Case("POST", A, ("worker",), extra_args=("disable",)),
    ],
    "tokens": [Case("GET", V), Case("POST", V, data={"name": "mine", "expires_in_days": "7"})],
    "token-revoke": [Case("POST", V, ("own_token",))],
    "api:tasks": [
        Case("GET", V, json=True),
        Case("POST", OP, data={"name": "made", "command": "true"}, json=True),
    ],
    "api:task": [
        Case("GET", V, ("task",), json=True),
        Case("PUT", OP, ("task",), data={"command": "false"}, json=True),
        Case("PATCH", OP, ("task",), data={"command": "false"}, json=True),
        Case("DELETE", OP, ("task",), json=True),
    ],
    "api:task-run": [Case("POST", OP, ("task",), json=True)],
    "api:runs": [Case("GET", V, json=True), Case("POST", OP, data={"task": 0}, json=True)],
    "api:run": [Case("GET", V, ("queued",), json=True)],
    "api:runs-cancel": [Case("POST", OP, data={"ids": ["queued"]}, json=True)],
    "api:runs-retry": [Case("POST", OP, data={"ids": ["finished"]}, json=True)],
    "api:run-cancel": [Case("POST", OP, ("queued",), json=True)],
    "api:run-retry": [Case("POST", OP, ("finished",), json=True)],
    "api:run-result": [Case("GET", V, ("finished",), json=True)],
    "api:run-events": [Case("GET", V, ("finished",), json=True)],
    "api:scheduler": [Case("GET", V, json=True)],
    "api:scheduler-pause": [Case("POST", A, json=True)],
    "api:scheduler-resume": [Case("POST", A, json=True)],
    "api:workers": [Case("GET", V, json=True)],
    "api:worker-approve": [Case("POST", A, ("pending",), json=True)],
    "api:audit": [Case("GET", A, json=True)],
    "api:worker-action": [
        Case("POST", OP, ("worker",), json=True, extra_args=("drain",)),
        Case("POST", OP, ("worker",), json=True, extra_args=("resume",)),
        Case("POST", A, ("worker",), json=True, extra_args=("disable",)),
        Case("POST", A, ("worker",), json=True, extra_args=("enable",)),
    ],
    # Public, each for its own reason: enrollment is gated by the token in its
    # body, the shard outputs by a worker's credential, the documents say
    # nothing secret, the catch-all answers 404.
    "api:worker-register": [Case("POST", PUBLIC, json=True)],
    "api:agent-shard-outputs": [Case("GET", PUBLIC)],
    "api:agent-shard-output": [Case("GET", PUBLIC)],
    "api:openapi": [Case("GET", PUBLIC)],
    "api:docs": [Case("GET", PUBLIC)],
    "api:no-such-endpoint": [Case("GET", PUBLIC)],
    "agent-download": [Case("GET", PUBLIC)],
    "login": [Case("GET", PUBLIC)],
    "logout": [Case("POST", PUBLIC)],
    # For Prometheus and load balancers, which have no session: /metrics is
    # gated by the address or its own token (tests/test_health.py), the probes
    # say nothing secret.
    "metrics": [Case("GET", PUBLIC)],
    "healthz": [Case("GET", PUBLIC)],
    "readyz": [Case("GET", PUBLIC)],
}

PERSONAS = {"viewer": V, "operator": OP, "admin": A, "outsider": None}


def _url_names(patterns, namespace: str = "") -> dict[str, Any]:
    """url name -> view, over the URL conf, Django admin's own URLs left out
    (the admin site has its own check: test_only_admins_reach_django_admin)."""
    found: dict[str, Any] = {}
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            if pattern.namespace == "admin":
                continue
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            found |= _url_names(pattern.url_patterns, inner)
        elif isinstance(pattern, URLPattern):
            found[f"{namespace}{pattern.name}"] = pattern.callback
    return found


def _views() -> dict[str, Any]:
    return _url_names(get_resolver().url_patterns)


def test_every_url_and_api_method_has_a_rule():
    views = _views()
    # A row for every URL, and none for a URL that is gone.
    assert set(views) == set(CASES)
    for name, view in views.items():
        declared = getattr(view, "api_operations", None)
        if declared is not None:
            # The API: each method's Operation names a role or says public.
            for method, operation in declared.items():
                rule = operation.role or PUBLIC
                assert rule in {c.needed for c in CASES[name] if c.method == method}, (name, method)
        elif {c.needed for c in CASES[name]} != {PUBLIC}:
            # The dashboard: the view declares the lowest role of its rows.
            lowest = min(roles.ROLES.index(c.needed) for c in CASES[name])
            assert getattr(view, "required_role", None) == roles.ROLES[lowest], name


@pytest.fixture
def world(django_user_model):
    """The objects the requests act on, and a client per persona (API: a token)."""
    task = Task.objects.create(name="answer", command="true")
    queued = lifecycle.trigger_run(task)
    finished = lifecycle.trigger_run(task)
    worker = Worker.objects.create(
        name="node-1", capacity=2, credential_hash=tokens.digest("wkr_x"), state="online"
    )
    attempt = finished.attempts.get()
    lifecycle.assign(attempt.pk, worker.pk, worker.name)
    now = time.time()
    lifecycle.mark_started(worker.pk, attempt.pk, now, pid=4242)
    lifecycle.finish(worker.pk, attempt.pk, lifecycle.Result("succeeded", 0, "", now, now))
    people = {}
    for persona, role in PERSONAS.items():
        user = django_user_model.objects.create_user(persona, password=f"{persona}-pass-1234")
        roles.set_role(user, role)
        raw, token = ApiToken.mint(user, name="tests")
        browser = Client()
        browser.force_login(user)
        api = Client(headers={"Authorization": f"Bearer {raw}"})
        people[persona] = (browser, api, token)
    pending = Worker.objects.create(
        name="node-2",
        credential_hash=tokens.digest("wkr_y"),
        state="pending",
        approved_at=None,
        requested_labels=["linux"],
        requested_capacity=2,
    )
    _, enrollment = EnrollmentToken.mint(note="roles")
    objects = {
        "task": task.pk,
        "queued": queued.pk,
        "finished": finished.pk,
        "finished_attempt": attempt.pk,
        "worker": worker.pk,
        "pending": pending.pk,
        "enrollment": enrollment.pk,
    }
    return objects, people


def _state() -> list:
    """Everything a request could change, to compare before and after."""
    models = (Task, Run, Attempt, Worker, SchedulerState, ApiToken, EnrollmentToken)
    state = [list(model.objects.order_by("pk").values()) for model in models]
    for token in state[models.index(ApiToken)]:
        del token["last_used_at"]  # a refused request still used its token
    return [*state, list(User.groups.through.objects.order_by("pk").values())]


def _send(world, persona: str, name: str, case: Case):
    objects, people = world
    browser, api, token = people[persona]
    args = [token.pk if a == "own_token" else objects[a] for a in case.args]
    url = reverse(name, args=[*args, *case.extra_args])
    data = dict(case.data)
    if name == "api:runs" and case.method == "POST":
        data["task"] = objects["task"]
    # Bulk actions name the world's runs in their body.
    if isinstance(data.get("ids"), str):
        data["ids"] = objects[data["ids"]]
    elif isinstance(data.get("ids"), list):
        data["ids"] = [objects[name] for name in data["ids"]]
    client = api if case.json else browser
    if case.json:
        return client.generic(case.method, url, json.dumps(data), "application/json")
    return client.generic(case.method, url, _form(data), "application/x-www-form-urlencoded")


def _form(data: dict) -> str:
    return urlencode(data)


ROLE_CASES = [
    pytest.param(name, index, persona, id=f"{persona}-{case.method}-{name}-{index}")
    for name, cases in CASES.items()
    for index, case in enumerate(cases)
    if case.needed != PUBLIC
    for persona in PERSONAS
]


@pytest.mark.parametrize(("name", "index", "persona"), ROLE_CASES)
def test_each_persona_can_do_what_its_role_allows_and_nothing_else(world, name, index, persona):
    case = CASES[name][index]
    allowed = PERSONAS[persona] is not None and roles.allows_role(PERSONAS[persona], case.needed)
    before = _state()

    response = _send(world, persona, name, case)

    if allowed:
        assert 200 <= response.status_code < 400, response.content[:300]
    else:
        assert response.status_code == 403
        assert _state() == before
        # The refusal names the role of the view, or of the action when the
        # caller has the view's role but not the action's (a worker's disable).
        if case.json:
            view_role = _views()[name].api_operations[case.method].role
        else:
            view_role = _lowest(c.needed for c in CASES[name])
        has_view_role = PERSONAS[persona] is not None and roles.allows_role(
            PERSONAS[persona], view_role
        )
        refused = case.needed if has_view_role else view_role
        if case.json:
            assert response.json() == {"error": roles.refusal(refused)}
        else:
            assert f"needs the {refused} role" in response.content.decode()


def _lowest(needed) -> str:
    return roles.ROLES[min(roles.ROLES.index(n) for n in needed)]


def test_anonymous_requests_get_the_login_page_or_a_401(client, task):
    page = client.get(reverse("tasks:detail", args=[task.pk]))
    api = client.get(reverse("api:task", args=[task.pk]))

    assert page.status_code == 302 and page["Location"].startswith(reverse("login"))
    assert api.status_code == 401 and api["WWW-Authenticate"] == 'Bearer realm="api"'


def test_only_admins_reach_django_admin(world):
    _, people = world
    from django.contrib import admin

    for model in admin.site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for persona in PERSONAS:
            response = people[persona][0].get(url)
            if persona == "admin":
                assert response.status_code == 200, url
            else:
                assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.parametrize(
    ("persona", "shown", "hidden"),
    [
        ("viewer", [], ["run-task", "Edit</a>", "cancel-run", "pause-scheduler", "Add worker"]),
        ("operator", ["run-task", "Edit</a>"], ["pause-scheduler", "Add worker", "Revoke"]),
        ("admin", ["run-task", "pause-scheduler", "Add worker", "Revoke"], []),
    ],
)
def test_pages_show_only_the_buttons_the_role_can_use(world, persona, shown, hidden):
    objects, people = world
    browser = people[persona][0]
    pages = "".join(
        browser.get(url).content.decode()
        for url in (
            reverse("tasks:detail", args=[objects["task"]]),
            reverse("tasks:run-detail", args=[objects["queued"]]),
            reverse("workers:list"),
        )
    )
    for text in shown:
        assert text in pages, text
    for text in hidden:
        assert text not in pages, text


def test_an_outsider_is_told_it_has_no_role(world):
    _, people = world

    page = people["outsider"][0].get(reverse("tasks:list"))

    assert page.status_code == 403
    assert "Your account has no role yet" in page.content.decode()


def test_a_token_carries_its_users_role_and_follows_a_change_of_it(world):
    objects, people = world
    api = people["viewer"][1]
    url = reverse("api:task-run", args=[objects["task"]])
    assert api.post(url).status_code == 403

    roles.set_role(User.objects.get(username="viewer"), roles.OPERATOR)

    assert api.post(url).status_code == 201


def test_an_expired_or_revoked_token_is_refused(world):
    from datetime import timedelta

    from django.utils import timezone

    _, people = world
    browser, api, token = people["admin"]
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert api.get(reverse("api:tasks")).json() == {
        "error": "invalid, expired or revoked API token"
    }

    ApiToken.objects.filter(pk=token.pk).update(expires_at=None)
    assert api.get(reverse("api:tasks")).status_code == 200
    browser.post(reverse("token-revoke", args=[token.pk]))
    assert api.get(reverse("api:tasks")).status_code == 401


def test_the_tokens_page_mints_lists_and_revokes_only_the_owners_tokens(world):
    _, people = world
    browser, _, own = people["operator"]
    others = people["viewer"][2]

    page = browser.post(reverse("tokens"), {"name": "deploy", "expires_in_days": "30"})

    text = page.content.decode()
    raw = text.split('id="token-value">')[1].split("<")[0]
    minted = ApiToken.objects.get(token_hash=tokens.digest(raw))
    assert (minted.name, minted.user.username) == ("deploy", "operator")
    assert 29 <= (minted.expires_at - minted.created_at).days <= 30
    assert f'data-token="{own.pk}"' in text and f'data-token="{others.pk}"' not in text
    # Not shown again.
    assert raw not in browser.get(reverse("tokens")).content.decode()
    # Another user's token is none of this user's business.
    assert browser.post(reverse("token-revoke", args=[others.pk])).status_code == 404
    assert ApiToken.objects.get(pk=others.pk).revoked_at is None


def test_last_used_is_written_at_most_once_a_minute(world):
    _, people = world
    api, token = people["viewer"][1], people["viewer"][2]
    api.get(reverse("api:scheduler"))
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            api.get(reverse("api:scheduler"))

    assert not [q for q in queries if q["sql"].startswith("UPDATE")]
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first


def test_createuser_makes_a_user_of_each_role(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("correct horse battery staple\n")

    call_command("createuser", "carol", "--role", "operator", "--password-file", str(secret))
    call_command("createuser", "robot", "--role", "viewer")

    carol, robot = User.objects.get(username="carol"), User.objects.get(username="robot")
    assert roles.role_of(carol) == "operator" and carol.check_password(
        "correct horse battery staple"
    )
    assert roles.role_of(robot) == "viewer" and not robot.has_usable_password()
    with pytest.raises(CommandError, match="exists; add --update"):
        call_command("createuser", "carol", "--role", "admin")
    call_command("createuser", "carol", "--role", "admin", "--update")
    assert roles.role_of(User.objects.get(username="carol")) == "admin"
    assert [g.name for g in User.objects.get(username="carol").groups.all()] == ["admin"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x", "--role", "root"], "invalid choice: 'root'"),
        (["bad name!", "--role", "viewer"], "username 'bad name!'"),
        (["x", "--role", "viewer", "--password-file", "/nonexistent"], "No such file"),
    ],
)
def test_createuser_refuses_bad_input_and_creates_nothing(argv, message):
    with pytest.raises(CommandError, match=message):
        call_command("createuser", *argv)
    assert not User.objects.exists()


def test_createuser_applies_the_password_validators(tmp_path):
    weak = tmp_path / "pw"
    weak.write_text("abc\n")

    with pytest.raises(CommandError, match="password: This password is too short"):
        call_command("createuser", "x", "--role", "viewer", "--password-file", str(weak))
    assert not User.objects.exists()


def test_the_migration_made_the_three_groups_with_their_permissions():
    held = {
        group.name: set(group.permissions.values_list("codename", flat=True))
        for group in Group.objects.filter(name__in=roles.ROLES)
    }
    assert held["viewer"] == {"view_scheduler"}
    assert held["operator"] == {"view_scheduler", "operate_scheduler"}
    assert {"view_scheduler", "operate_scheduler", "administer_scheduler", "change_task"} <= held[
        "admin"
    ]


def test_a_viewer_cannot_edit_a_worker_through_django_admin_and_admins_cannot_set_its_state(world):
    objects, people = world
    url = reverse("admin:workers_app_worker_change", args=[objects["worker"]])

    assert people["viewer"][0].get(url).status_code == 302
    page = people["admin"][0].get(url).content.decode()
    assert 'name="state"' not in page and 'name="approved_at_0"' not in page


def test_users_with_finds_each_way_of_holding_a_role_in_one_query(
    django_user_model, django_assert_num_queries
):
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    def user(name: str, role: str | None = None, **extra) -> int:
        made = django_user_model.objects.create_user(name, **extra)
        roles.set_role(made, role)
        return made.pk

    ids = {
        "superuser": user("superuser", is_superuser=True),
        "admin": user("admin", roles.ADMIN),
        "operator": user("operator", roles.OPERATOR),
        "viewer": user("viewer", roles.VIEWER),
        "outsider": user("outsider"),
        "inactive operator": user("inactive", roles.OPERATOR, is_active=False),
        "inactive superuser": user("gone", is_superuser=True, is_active=False),
        "direct operator": user("direct"),
        "same codename, other app": user("lookalike"),
    }
    User.objects.get(pk=ids["direct operator"]).user_permissions.add(
        Permission.objects.get(codename="operate_scheduler", content_type__app_label="tasks_app")
    )
    elsewhere = Permission.objects.create(
        codename="operate_scheduler",
        name="the same codename on another model",
        content_type=ContentType.objects.get_for_model(Worker),
    )
    User.objects.get(pk=ids["same codename, other app"]).user_permissions.add(elsewhere)
    named = {pk: name for name, pk in ids.items()}

    def holders(needed: str, among=None) -> set[str]:
        return {named[pk] for pk in roles.users_with(needed, among or ids.values())}

    with django_assert_num_queries(1):
        operators = holders(roles.OPERATOR)
    assert operators == {"superuser", "admin", "operator", "direct operator"}
    assert holders(roles.ADMIN) == {"superuser", "admin"}
    assert holders(roles.VIEWER) == {"superuser", "admin", "operator", "viewer", "direct operator"}
    # Only those asked about, and an id of nobody is nobody.
    assert holders(roles.OPERATOR, [ids["viewer"], ids["operator"], 10**9]) == {"operator"}
    with django_assert_num_queries(0):
        assert roles.users_with(roles.OPERATOR, []) == set()
