"""The task form and the delete page: multi-line commands, the env check, the folds."""

from __future__ import annotations

import re

import pytest
from django.utils.html import escape

from tasks_app import lifecycle
from tasks_app.forms import TaskForm
from tasks_app.models import Task
from workers_app import protocol

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


# --- 3. the form -----------------------------------------------------------------------


def test_it_keeps_a_multi_line_shell_script_through_save_edit_and_the_agents_frame(bob_client):
    script = 'for i in 1 2\r\ndo\r\n  echo "line $i"\r\ndone'

    response = bob_client.post(
        "/tasks/new/", {"name": "script", "command": script, "shell": "on", "enabled": "on"}
    )

    assert response.status_code == 302
    task = Task.objects.get(name="script")
    assert task.command == 'for i in 1 2\ndo\n  echo "line $i"\ndone'
    edit = bob_client.get(f"/tasks/{task.pk}/edit/").content.decode()
    # The first newline after <textarea> is HTML's, not the value's.
    assert re.search(
        r'<textarea name="command" [^>]*id="id_command">\n'
        r"for i in 1 2\ndo\n  echo &quot;line \$i&quot;\ndone</textarea>",
        edit,
    )
    run = lifecycle.trigger_run(task)
    frame = protocol.assign(run.attempts.get().pk, run.pk, run.task_name, run.definition)
    assert (frame["argv"], frame["shell"]) == (None, task.command)


def test_it_splits_a_multi_line_command_without_shell_into_one_argv(bob_client):
    bob_client.post("/tasks/new/", {"name": "argv", "command": "printf '%s|'\r\n  a\r\n  'b c'"})

    task = Task.objects.get(name="argv")
    assert task.definition()["argv"] == ["printf", "%s|", "a", "b c"]
    assert "newlines count as spaces" in bob_client.get("/tasks/new/").content.decode()


def test_it_reports_every_bad_environment_line(bob_client):
    env = "GOOD=1\r\nNOPE\r\n1BAD=x\r\nGOOD=2\r\nALSO WRONG\r\n"

    response = bob_client.post("/tasks/new/", {"name": "env", "command": "true", "env": env})

    html = response.content.decode()
    errors = re.findall(r'<p class="error field-error" data-field="env">([^<]*)</p>', html)
    assert errors == [
        escape("Line 2: expected KEY=VALUE, got 'NOPE'."),
        escape(
            "Line 3: Invalid variable name '1BAD': "
            "use letters, digits and '_', not starting with a digit."
        ),
        "Line 4: GOOD is already set on line 1.",
        escape("Line 5: expected KEY=VALUE, got 'ALSO WRONG'."),
    ]
    assert not Task.objects.exists()


def test_it_reports_every_bad_environment_variable_through_the_api(client, bob_token):
    response = client.post(
        "/api/tasks",
        {"name": "t", "command": "true", "env": {"1BAD": "x", "OK": "y", "PORT": 8080}},
        content_type="application/json",
        headers={"Authorization": f"Bearer {bob_token}"},
    )

    # Both, each keyed by where it is (the API's schema names a value's path).
    assert response.status_code == 400
    assert response.json()["errors"] == {
        "env": [
            "Invalid variable name '1BAD': use letters, digits and '_', not starting with a digit."
        ],
        "env.PORT": ["Expected a string."],
    }
    assert not Task.objects.exists()


def test_it_folds_retries_under_advanced_and_opens_the_fold_on_their_errors(bob_client):
    closed = bob_client.get("/tasks/new/").content.decode()
    fold = closed[
        closed.index('<details class="advanced" id="advanced">') : closed.index("</details>")
    ]
    for name in TaskForm.ADVANCED_FIELDS:
        assert f'name="{name}"' in fold
        assert f'name="{name}"' not in closed.replace(fold, "")

    response = bob_client.post(
        "/tasks/new/", {"name": "x", "command": "true", "max_retries": "-1"}, headers=HTMX
    )
    html = response.content.decode()
    assert '<details class="advanced" id="advanced" open>' in html
    assert '<p class="error field-error" data-field="max_retries">' in html
    assert (
        '<details class="advanced" id="advanced" open>'
        not in bob_client.post(
            "/tasks/new/", {"name": "", "command": "true"}, headers=HTMX
        ).content.decode()
    )


def test_it_answers_an_empty_command_with_its_own_inline_error(bob_client):
    form = bob_client.get("/tasks/new/").content.decode()
    assert re.search(r'<form id="task-form" class="card form" method="post" novalidate', form)

    response = bob_client.post("/tasks/new/", {"name": "x", "command": "  \r\n "}, headers=HTMX)

    html = response.content.decode()
    assert '<p class="error field-error" data-field="command">Enter the command to run.</p>' in html
    assert not Task.objects.exists()


# --- 4. the delete page ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs", "sentence"),
    [
        (0, "The task definition is removed. It has never run."),
        (1, "Its 1 run stays in the history, readable as before."),
        (2, "Its 2 runs stay in the history, readable as before."),
    ],
)
def test_it_counts_the_runs_that_stay_in_plain_english(bob_client, task, runs, sentence):
    for _ in range(runs):
        lifecycle.trigger_run(task)

    html = bob_client.get(f"/tasks/{task.pk}/delete/").content.decode()

    assert sentence in html


@pytest.mark.parametrize("name", ["PATH\n", "A B", "1X", "É"])
def test_it_refuses_a_variable_name_that_only_starts_well(client, bob_token, name):
    """A regex's `$` also matches before a final newline: the whole name must fit."""
    response = client.post(
        "/api/tasks",
        {"name": "t", "command": "true", "env": {name: "x"}},
        content_type="application/json",
        headers={"Authorization": f"Bearer {bob_token}"},
    )

    assert response.status_code == 400
    assert "env" in response.json()["errors"]
    assert not Task.objects.exists()


def test_a_runs_parameters_report_every_bad_variable(client, bob_token, task):
    response = client.post(
        f"/api/tasks/{task.pk}/run",
        {"env": {"1BAD": "x", "OK": "y", "ALSO BAD": "z"}},
        content_type="application/json",
        headers={"Authorization": f"Bearer {bob_token}"},
    )

    assert response.status_code == 400
    messages = " ".join(sum(response.json()["errors"].values(), []))
    assert "'1BAD'" in messages and "'ALSO BAD'" in messages
    assert not task.runs.exists()


@pytest.mark.django_db
def test_a_bad_line_of_new_secrets_is_named_by_its_number_never_shown(bob_client):
    # A pasted key's second line has no "=": the value must not come back in the page.
    form = {
        "name": "deploy",
        "command": "true",
        "timezone": "UTC",
        "secret_env": "KEY=-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    }

    page = bob_client.post("/tasks/new/", form).content.decode()

    assert "Line 2: expected KEY=VALUE." in page
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in page and "BEGIN KEY" not in page
    assert not Task.objects.exists()
