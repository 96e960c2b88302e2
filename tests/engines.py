"""The real PostgreSQL and Redis for the scale-out tests, and a database and a
key prefix of each test's own.

The services are those of the development and CI machines (127.0.0.1:5432,
user postgres, trust auth; 127.0.0.1:6379); SCHEDULER_TEST_POSTGRES and
SCHEDULER_TEST_REDIS point elsewhere. When they cannot be reached the tests
that need them skip on a laptop, but fail under CI (CI set): a scale-out
test that silently skipped would prove nothing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import pytest


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


# A run of the whole suite on the real engines (`make test-postgres`: DATABASE_URL
# and REDIS_URL set) makes its servers' databases and prefixes on those same services.
ADMIN_URL = os.environ.get("SCHEDULER_TEST_POSTGRES") or with_database(
    os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432", "postgres"
)
REDIS_URL = (
    os.environ.get("SCHEDULER_TEST_REDIS")
    or os.environ.get("REDIS_URL")
    or "redis://127.0.0.1:6379/0"
)


def _unreachable(what: str, exc: Exception) -> None:
    message = f"{what} is unreachable ({exc}); the scale-out tests need it"
    if "PYTEST_CURRENT_TEST" not in os.environ:
        raise RuntimeError(message)  # the benchmark, outside pytest
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: failing instead of skipping)", pytrace=False)
    pytest.skip(message)


def _admin():
    import psycopg

    # autocommit: CREATE/DROP DATABASE cannot run inside a transaction.
    return psycopg.connect(libpq(ADMIN_URL), autocommit=True, connect_timeout=5)


def libpq(url: str) -> str:
    """psycopg takes postgresql:// but not dj-database-url's postgres:// alias."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", *parts[1:]))


def create_database() -> str:
    """A new empty database; its URL (postgres://...)."""
    name = f"sched_test_{uuid.uuid4().hex[:12]}"
    try:
        with _admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # psycopg.OperationalError, or psycopg missing
        _unreachable(f"PostgreSQL at {ADMIN_URL}", exc)
    return with_database(ADMIN_URL, name)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with _admin() as conn:
        # FORCE (PostgreSQL 13+): a server process killed mid-test leaves sessions behind.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)


def create_prefix() -> str:
    """A Redis key prefix of our own for channels_redis."""
    try:
        redis_client().ping()
    except Exception as exc:
        _unreachable(f"Redis at {REDIS_URL}", exc)
    return f"sched-test-{uuid.uuid4().hex[:12]}"


def drop_prefix(prefix: str) -> None:
    client = redis_client()
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@dataclass
class ScaleOut:
    """The environment of servers that share one PostgreSQL database and one
    Redis prefix (several `serve` processes of one install)."""

    database_url: str
    prefix: str
    # One install: the same SECRET_KEY on every server, so a login on one is
    # valid on the others (README, deployment).
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex * 2)

    @classmethod
    def create(cls) -> ScaleOut:
        return cls(create_database(), create_prefix())

    @property
    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": REDIS_URL,
            "SCHEDULER_REDIS_PREFIX": self.prefix,
            "SECRET_KEY": self.secret_key,
        }

    def drop(self) -> None:
        if self.database_url:
            drop_database(self.database_url)
        if self.prefix:
            drop_prefix(self.prefix)


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a query on that database (what the servers stored)."""
    import psycopg

    with psycopg.connect(libpq(url), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def query_plan(cursor, sql: str) -> str:
    """The plan of a query, as one line of text (SQLite's EXPLAIN QUERY PLAN,
    PostgreSQL's EXPLAIN)."""
    explain = "EXPLAIN QUERY PLAN" if cursor.db.vendor == "sqlite" else "EXPLAIN"
    cursor.execute(f"{explain} {sql}")
    return " ".join(str(row) for row in cursor.fetchall())


# The step of a plan that sorts rows instead of reading them in an index's order.
SORT_STEP = {"sqlite": "USE TEMP B-TREE", "postgresql": "Sort"}


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """For a test about the SQLite install itself: the run on PostgreSQL
    (DATABASE_URL set) skips it, saying why. Keep these few."""
    return pytest.mark.skipif(bool(os.environ.get("DATABASE_URL")), reason=f"SQLite only: {reason}")


def forget_channel_layer() -> None:
    """On Redis, make the next event loop build a channel layer of its own.

    channels_redis keeps one receive lock per channel for the whole layer, and a
    receive cancelled while it waits for that lock (a consumer that stops while a
    message's backup is being cleaned) leaves the lock behind, bound to its event
    loop. Daphne runs one loop per process, so that never matters to a server;
    tests start a loop per async test and per async_to_sync call, and the next
    loop to wait on the left-behind lock raises "is bound to a different event
    loop". The in-memory layer has no such lock, and its messages live in the
    instance, so it is kept.
    """
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
    from django.conf import settings

    if settings.REDIS_URL:
        channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def in_own_loop(coroutine_function, *args):
    """async_to_sync(coroutine_function)(*args) in a loop with a channel layer of its own."""
    from asgiref.sync import async_to_sync

    try:
        return async_to_sync(coroutine_function)(*args)
    finally:
        forget_channel_layer()
