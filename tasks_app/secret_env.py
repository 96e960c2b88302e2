"""A task's secret environment: encrypted at rest, masked in output.

The values are stored as one Fernet token (AES-128-CBC + HMAC-SHA256) of
their JSON, under a key derived from SECRET_KEY with HKDF-SHA256, so that a
copy of the database alone does not reveal them. A run's snapshot keeps the
same token; it is decrypted only to build the assign frame for its agent
(workers_app.protocol.assign) and to mask stored output (tasks_app.logs).
SECRET_KEY_FALLBACKS are tried too, so rotating the key the Django way keeps
existing secrets readable until the tasks are saved again.

A key changed without its fallback makes the tokens unreadable: the names
stay known (Task.secret_env_keys, kept in clear), a trigger is refused, and a
queued run fails at dispatch with UNREADABLE (workers_app.dispatch) until
the values are set again.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

from tasks_app.exceptions import SecretsUnreadable

MASK = "***"
# Why a run whose secrets cannot be decrypted fails, for people.
UNREADABLE = (
    "its secret variables were encrypted with another SECRET_KEY; set them again on the task"
)
# Values shorter than this are not masked: replacing every "1" or "on" in the
# output would destroy it and tell a reader the value anyway (GitHub Actions
# and GitLab CI skip short values the same way).
MIN_MASKED_LENGTH = 3


def _fernet(secret_key: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"scheduler task secret_env v1",
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


@lru_cache(maxsize=4)
def _cipher(secret_key: str, fallbacks: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_fernet(k) for k in (secret_key, *fallbacks)])


def cipher() -> MultiFernet:
    return _cipher(settings.SECRET_KEY, tuple(getattr(settings, "SECRET_KEY_FALLBACKS", ())))


def encrypt(values: dict[str, str]) -> str:
    """The stored form of a secret environment; "" for none."""
    if not values:
        return ""
    return cipher().encrypt(json.dumps(values, sort_keys=True).encode()).decode()


def readable(token: str) -> bool:
    """Whether decrypt(token) would succeed."""
    try:
        decrypt(token)
    except SecretsUnreadable:
        return False
    return True


def decrypt(token: str) -> dict[str, str]:
    """The values of a stored secret environment ({} for "")."""
    if not token:
        return {}
    return dict(_decrypt(token, settings.SECRET_KEY))


@lru_cache(maxsize=1024)
def _decrypt(token: str, secret_key: str) -> tuple[tuple[str, str], ...]:
    # Cached by token: dispatch and log storage decrypt the same few runs'
    # tokens over and over, and a token never changes meaning under one key.
    try:
        plain = cipher().decrypt(token.encode())
    except InvalidToken:
        raise SecretsUnreadable(UNREADABLE) from None
    return tuple(sorted(json.loads(plain).items()))


def maskable(values) -> list[str]:
    """The values to mask, longest first (so that a value containing another
    is masked whole)."""
    return sorted({v for v in values if len(v) >= MIN_MASKED_LENGTH}, key=len, reverse=True)


def mask(text: str, values: list[str]) -> str:
    """text with every occurrence of the values (from maskable()) replaced by ***."""
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text
