"""Hardened defaults (issue 10): the documented production settings pass
Django's deployment check, request bodies are capped before they are read,
deeply nested JSON is a 400.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys

import pytest

from tests.harness import ROOT

# --- production settings: manage.py check --deploy -----------------------------------


def _production_env() -> dict[str, str]:
    """The variables of the README's production env file, as systemd reads them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Settings, the same on every server", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    env = {}
    for line in block.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def _check_deploy(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path / "data"), **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
    )


def test_the_documented_production_settings_pass_check_deploy(tmp_path):
    env = _production_env()
    assert env["SCHEDULER_HTTPS"] == "true"  # the block is the one we think it is
    # The README's placeholder, replaced as its comment says to.
    assert env["SECRET_KEY"] == "..."
    env["SECRET_KEY"] = secrets.token_urlsafe(50)

    result = _check_deploy(tmp_path, env)

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNINGS" not in result.stderr


def test_check_deploy_warns_about_the_laptop_defaults(tmp_path):
    """The test above can fail: without the production variables, it does."""
    result = _check_deploy(tmp_path, {})

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


def test_https_without_the_proxy_header_is_refused(tmp_path):
    full = {**os.environ, "SCHEDULER_DATA_DIR": str(tmp_path / "data"), "SCHEDULER_HTTPS": "true"}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=full, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SCHEDULER_HTTPS=true needs"
        " SCHEDULER_PROXY_SSL_HEADER (e.g. X-Forwarded-Proto), the header the proxy that ends"
        " TLS sets: without it every request looks like plain http and would be redirected to"
        " https again and again"
    )


@pytest.mark.parametrize("value", ["HTTP_X_FORWARDED_PROTO", "X-Forwarded-Proto: https"])
def test_a_proxy_header_that_is_not_a_header_name_is_refused(tmp_path, value):
    full = {
        **os.environ,
        "SCHEDULER_DATA_DIR": str(tmp_path / "data"),
        "SCHEDULER_PROXY_SSL_HEADER": value,
    }
    full.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=full, capture_output=True, text=True
    )
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SCHEDULER_PROXY_SSL_HEADER must be a header"
        f" name such as X-Forwarded-Proto, not {value!r}"
    )
