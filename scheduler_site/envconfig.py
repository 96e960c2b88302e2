"""Strict readers for settings that come from environment variables.

A typo in an environment variable must stop the server at start-up with a
message naming the variable, not run with a silently different value.

A variable that is set but empty (`SCHEDULER_DATA_DIR=` in a unit file, or
`SCHEDULER_DATA_DIR=$DIR` with DIR unset) is an error too, except where empty
is the default anyway: it almost always means a value went missing, and the
fallbacks are worse (an empty data dir is the current directory, whose
`static/` then collides with the project's: Django's cryptic staticfiles.E002).
"""

import math
import os
import re
import zoneinfo
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _raw(name: str, default_text: str) -> str | None:
    """The variable's value, None when unset; set but blank is refused."""
    raw = os.environ.get(name)
    if raw is not None and not raw.strip():
        raise ImproperlyConfigured(
            f"{name} is set but empty: unset it to use the default ({default_text}) or give a value"
        )
    return raw


def env_str(name: str, default: str = "", *, default_text: str = "") -> str:
    """The variable, or the content of the file named by NAME_FILE (for secrets)."""
    file_name = _raw(f"{name}_FILE", f"{name}, or {default_text or repr(default)}")
    if file_name:
        try:
            value = Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {file_name}: {exc}") from exc
        if not value:
            raise ImproperlyConfigured(f"{name}_FILE: {file_name} is empty")
        return value
    raw = _raw(name, default_text or repr(default))
    return default if raw is None else raw


def env_token(name: str, *, min_length: int, default_text: str) -> str:
    """A shared secret sent in a header (NAME or NAME_FILE), or empty when unset.
    Long enough not to be guessed, and only characters a header carries whole."""
    value = env_str(name, default_text=default_text)
    if not value:
        return ""
    where = f"{name}_FILE" if os.environ.get(f"{name}_FILE") else name
    if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", value):
        raise ImproperlyConfigured(
            f"{where}: the token may hold letters, digits and . _ ~ + / = - only"
            " (no spaces); e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if len(value) < min_length:
        raise ImproperlyConfigured(
            f"{where}: the token must be at least {min_length} characters, not {len(value)};"
            " e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = _raw(name, str(default).lower())
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}")


def env_number(name: str, default: float, *, minimum: float, integer: bool = False) -> float:
    raw = _raw(name, str(default))
    if raw is None:
        return default
    kind = "a whole number" if integer else "a number"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {kind}, not {raw!r}") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf"
        raise ImproperlyConfigured(f"{name} must be {kind}, not {raw!r}")
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = _raw(name, ",".join(default)) if default else os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_dir(name: str, default: Path) -> Path:
    """A directory, created when missing."""
    raw = _raw(name, str(default))
    path = (default if raw is None else Path(raw).expanduser()).resolve()
    if path.exists() and not path.is_dir():
        raise ImproperlyConfigured(f"{name}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(f"{name}: cannot create {path}: {exc.strerror}") from exc
    return path


def make_private(path: Path, mode: int) -> None:
    """Create the file (empty) or keep the directory with `mode`, and take group
    and other permissions away from one that exists (created by an older
    version, or under a looser umask). A path owned by someone else is left
    alone: chmod would fail, and its owner decided."""
    if not path.exists() and mode & 0o100 == 0:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
    try:
        current = path.stat()
        if current.st_uid == os.getuid() and current.st_mode & 0o077:
            path.chmod(current.st_mode & 0o700)
    except OSError:
        pass


def env_hosts(name: str, default: list[str]) -> list[str]:
    """Host names for ALLOWED_HOSTS: a URL there would make every request a 400."""
    hosts = env_list(name, default)
    if not hosts:
        # "," or " , ": set, yet no host at all, so every request would be refused.
        raise ImproperlyConfigured(f"{name} names no host; unset it for the default")
    for host in hosts:
        if "/" in host:
            bare = urlsplit(host).hostname if "://" in host else None
            hint = f" (just {bare})" if bare else ""
            raise ImproperlyConfigured(f"{name}: {host!r} is not a host name{hint}")
    return hosts


def env_url(name: str) -> str:
    """An http(s) URL with a host, or empty when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImproperlyConfigured(
            f"{name} must be an http:// or https:// URL such as http://master.example:8000,"
            f" not {raw!r}"
        )
    if parts.query or parts.fragment:
        raise ImproperlyConfigured(f"{name} takes no query or fragment, not {raw!r}")
    return raw


def env_time_zone(name: str, default: str) -> str:
    value = env_str(name, default)
    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise ImproperlyConfigured(
            f"{name}: unknown time zone {value!r}; use an IANA name such as UTC or Europe/Paris"
        ) from None
    return value


def env_log_level(name: str, default: str) -> str:
    value = env_str(name, default).upper()
    if value not in LOG_LEVELS:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value


def env_database(name: str, *, pool_size: int) -> dict | None:
    """A PostgreSQL database from a URL (dj-database-url), or None when unset
    (the embedded SQLite). NAME_FILE may hold the URL, which carries a password."""
    raw = env_str(name, default_text="SQLite in the data dir")
    if not raw:
        return None
    import dj_database_url

    scheme = urlsplit(raw).scheme
    if scheme not in ("postgres", "postgresql", "pgsql"):
        raise ImproperlyConfigured(
            f"{name} must be a postgres:// URL such as postgres://USER:PASSWORD@HOST:5432/NAME"
            f" (unset it for the embedded SQLite), not a {scheme or 'schemeless'} URL"
        )
    try:
        config = dj_database_url.parse(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    if not config.get("NAME"):
        raise ImproperlyConfigured(f"{name} names no database: add /NAME at the end")
    if pool_size:
        # psycopg's pool (Django 5.1+): under daphne every request runs in a
        # thread of its own, so a connection kept per thread (CONN_MAX_AGE)
        # would never be reused nor closed; a pool hands each request one of a
        # few open connections and takes it back when the request ends.
        config.setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": pool_size,
            "timeout": 10,
        }
    return config


def env_redis(name: str) -> str:
    """A Redis URL for the channel layer, or empty when unset (the in-memory layer)."""
    raw = env_str(name, default_text="the in-memory channel layer of one server process")
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ImproperlyConfigured(
            f"{name} must be a redis://HOST:6379/DB (or rediss://, unix://) URL, not {raw!r}"
        )
    try:
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if db and not db.isdigit():
            raise ValueError
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ImproperlyConfigured(f"{name}: {raw!r} has an invalid port or db number") from None
    return raw


def env_header(name: str, example: str = "X-Real-IP") -> str:
    """A request header's name as Django's request.META spells it (HTTP_X_REAL_IP),
    or empty when unset."""
    raw = env_str(name, default_text="unset")
    if not raw:
        return ""
    header = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ImproperlyConfigured(f"{name} must be a header name such as {example}, not {raw!r}")
    return "HTTP_" + header.upper().replace("-", "_")


def env_proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """SECURE_PROXY_SSL_HEADER from a header name (X-Forwarded-Proto): the header
    whose value "https" marks a request the proxy received over TLS; None when unset."""
    header = env_header(name, "X-Forwarded-Proto")
    return (header, "https") if header else None


def env_url_list(name: str) -> list[str]:
    """Comma-separated http(s) URLs (query strings allowed: webhooks often carry
    a token there); empty when unset."""
    urls = env_list(name, [])
    for url in urls:
        parts = urlsplit(url)
        try:
            host = parts.hostname
        except ValueError:
            host = None
        if parts.scheme not in ("http", "https") or not host:
            raise ImproperlyConfigured(f"{name}: {url!r} is not an http:// or https:// URL")
    return urls


def env_email_list(name: str) -> list[str]:
    """Comma-separated e-mail addresses; empty when unset."""
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    addresses = env_list(name, [])
    for address in addresses:
        try:
            validate_email(address)
        except ValidationError:
            raise ImproperlyConfigured(f"{name}: {address!r} is not an e-mail address") from None
    return addresses
