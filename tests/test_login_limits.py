"""Login attempts are rate limited per username and per address (django-axes),
and passwords meet Django's four standard validators."""

from __future__ import annotations

import secrets

import pytest
from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.test import Client, override_settings
from django.urls import reverse

pytestmark = pytest.mark.django_db

LIMIT = 5  # SCHEDULER_LOGIN_FAILURE_LIMIT's default
LOCKED = "Too many failed logins"


def _login(client: Client, username: str, password: str, address: str):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address
    )


def _fail(client: Client, username: str, address: str, times: int = LIMIT) -> None:
    """Failed logins; the one that reaches the limit is answered with the lockout."""
    for _ in range(times):
        response = _login(client, username, "wrong-password", address)
        if response.status_code != 429:
            assert response.status_code == 200
            assert "Wrong username or password." in response.content.decode()


def _locked(response) -> bool:
    return response.status_code == 429 and LOCKED in response.content.decode()


def test_the_defaults_are_documented():
    assert settings.AXES_FAILURE_LIMIT == LIMIT
    assert settings.AXES_LOCKOUT_PARAMETERS == ["username", "ip_address"]


def test_it_locks_a_username_even_from_another_address(client, bob):
    _fail(client, "bob", "10.0.0.1")

    # The right password, from an address that has never failed: still locked.
    response = _login(client, "bob", "bob-pass-123", "10.0.0.2")

    assert _locked(response)
    assert "after 5 failed attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_it_locks_an_address_that_guesses_many_usernames(client, bob):
    for name in ("root", "admin", "alice", "carol", "dave"):
        _fail(client, name, "10.0.0.9", times=1)

    assert _locked(_login(client, "bob", "bob-pass-123", "10.0.0.9"))
    # Bob himself, from elsewhere, is not locked out by someone else's guessing.
    response = _login(Client(), "bob", "bob-pass-123", "10.0.0.3")
    assert response.status_code == 302


def test_a_success_before_the_limit_resets_the_count(client, bob):
    _fail(client, "bob", "10.0.0.1", times=LIMIT - 1)
    assert _login(client, "bob", "bob-pass-123", "10.0.0.1").status_code == 302
    client.logout()

    _fail(client, "bob", "10.0.0.1", times=LIMIT - 1)
    assert _login(client, "bob", "bob-pass-123", "10.0.0.1").status_code == 302


def test_the_admin_login_is_limited_too(client, alice):
    for _ in range(LIMIT):
        client.post(
            "/admin/login/", {"username": "alice", "password": "nope"}, REMOTE_ADDR="10.0.0.4"
        )
    response = client.post(
        "/admin/login/",
        {"username": "alice", "password": "alice-pass-123"},
        REMOTE_ADDR="10.0.0.5",
    )
    assert _locked(response)


def test_api_tokens_are_not_affected_by_a_locked_login(client, bob, api):
    _fail(client, "bob", "10.0.0.1")

    assert api.get("/api/tasks").status_code == 200


@override_settings(SCHEDULER_CLIENT_IP_HEADER="HTTP_X_REAL_IP")
def test_behind_a_proxy_the_address_is_the_configured_header(client, bob):
    for name in ("root", "admin", "alice", "carol", "dave"):
        client.post(
            reverse("login"),
            {"username": name, "password": "x"},
            REMOTE_ADDR="127.0.0.1",  # nginx, for everyone
            HTTP_X_REAL_IP="203.0.113.7",
        )

    other_client = _login_via_proxy(Client(), "198.51.100.1")
    assert other_client.status_code == 302  # another client behind the same proxy
    assert _locked(_login_via_proxy(client, "203.0.113.7"))


def _login_via_proxy(client: Client, address: str):
    return client.post(
        reverse("login"),
        {"username": "bob", "password": "bob-pass-123"},
        REMOTE_ADDR="127.0.0.1",
        HTTP_X_REAL_IP=address,
    )


def test_without_the_setting_a_client_cannot_choose_its_address(client, bob):
    for index in range(LIMIT):
        client.post(
            reverse("login"),
            {"username": f"guess-{index}", "password": "x"},
            REMOTE_ADDR="10.0.0.8",
            HTTP_X_REAL_IP=f"192.0.2.{index}",
        )
    assert _locked(_login(client, "bob", "bob-pass-123", "10.0.0.8"))


# --- password validators ---------------------------------------------------------------


def test_all_four_standard_password_validators_are_on():
    names = {v["NAME"].rsplit(".", 1)[1] for v in settings.AUTH_PASSWORD_VALIDATORS}
    assert names == {
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    }
    with pytest.raises(Exception, match="too common"):
        validate_password("password123")


def test_the_personas_and_generated_passwords_pass_the_validators(alice, bob):
    validate_password("alice-pass-123", alice)
    validate_password("bob-pass-123", bob)
    # ensureadmin's (and so make run's) generated password, for its "admin".
    alice.username = "admin"
    for _ in range(20):
        validate_password(secrets.token_urlsafe(12), alice)
