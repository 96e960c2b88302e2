"""Shared personas and the real-process harness.

Personas (tasks_app.roles): alice is a superuser, bob an admin by group (the
everyday user of most tests), otto an operator, vera a viewer, oscar an
outsider (logged in, no role); `worker` is a registered agent with a known
credential. End-to-end tests use `master` (a real `manage.py serve` on a
free port with its own data dir) and `start_agent` (real agent processes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest

from tests import engines
from tests.harness import (
    FAST_SETTINGS,
    Agent,
    CuttableProxy,
    Master,
    spawn_agent,
    wait_for,
)

# --- the engines of the run -----------------------------------------------------


def pytest_sessionstart(session):
    """A run on PostgreSQL/Redis (`make test-postgres`) stops at once, saying
    which service is unreachable: each test erroring on its own connection (or
    the pytest-django test database failing to be made) hides the one cause."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.postgresql":
        import psycopg

        # The maintenance database: the one in DATABASE_URL is made by pytest-django.
        url = engines.with_database(engines.ADMIN_URL, "postgres")
        try:
            psycopg.connect(engines.libpq(url), connect_timeout=5).close()
        except psycopg.Error as exc:
            pytest.exit(f"PostgreSQL at {url} is unreachable ({exc}); DATABASE_URL needs it", 1)
    if settings.REDIS_URL:
        try:
            engines.redis_client().ping()
        except Exception as exc:  # redis.ConnectionError, TimeoutError
            pytest.exit(
                f"Redis at {engines.REDIS_URL} is unreachable ({exc}); REDIS_URL needs it", 1
            )


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, and on PostgreSQL the test database's other sessions
    ended before it is dropped: the writer's thread and the sync_to_async
    threads keep connections of their own to the end of the run, and DROP
    DATABASE refuses while anyone is connected (the database stayed behind)."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session", autouse=True)
def redis_prefix_of_this_run():
    """On Redis, this run's channel layer keys under a prefix of its own: two
    runs on one machine (or one Redis) would otherwise share groups, and a
    test's consumer receive the other run's group messages."""
    from django.conf import settings
    from django.test import override_settings

    if not settings.REDIS_URL:
        yield
        return
    prefix = engines.create_prefix()
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"]["CONFIG"]["prefix"] = prefix
    # Channels drops the layers it built when CHANNEL_LAYERS changes.
    with override_settings(CHANNEL_LAYERS=layers):
        yield
    engines.drop_prefix(prefix)


@pytest.fixture(autouse=True)
def a_channel_layer_per_test():
    """Each test's event loops get a Redis channel layer of their own (see
    engines.forget_channel_layer)."""
    yield
    engines.forget_channel_layer()


# --- personas ------------------------------------------------------------------


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_superuser(
        "alice", "alice@example.com", "alice-pass-123"
    )


@pytest.fixture
def bob(django_user_model):
    """The suite's everyday user: an admin by group (not a superuser)."""
    from tasks_app import roles

    user = django_user_model.objects.create_user("bob", "bob@example.com", "bob-pass-123")
    roles.set_role(user, roles.ADMIN)
    return user


def _persona(django_user_model, name: str, role: str | None):
    from tasks_app import roles

    user = django_user_model.objects.create_user(name, f"{name}@example.com", f"{name}-pass-123")
    roles.set_role(user, role)
    return user


@pytest.fixture
def vera(django_user_model):
    """A viewer."""
    return _persona(django_user_model, "vera", "viewer")


@pytest.fixture
def otto(django_user_model):
    """An operator."""
    return _persona(django_user_model, "otto", "operator")


@pytest.fixture
def oscar(django_user_model):
    """An outsider: can log in, has no role."""
    return _persona(django_user_model, "oscar", None)


@pytest.fixture
def bob_client(client, bob):
    client.force_login(bob)
    return client


@pytest.fixture
def bob_token(bob) -> str:
    from tasks_app import tokens
    from tasks_app.models import ApiToken

    raw, digest = tokens.mint("api")
    ApiToken.objects.create(user=bob, name="tests", token_hash=digest)
    return raw


@pytest.fixture
def api(bob_token):
    """A script's client: bearer token, no session, CSRF enforced like a real browser."""
    from django.test import Client

    return Client(enforce_csrf_checks=True, headers={"Authorization": f"Bearer {bob_token}"})


@pytest.fixture
def worker_credential() -> str:
    return "wkr_test-credential-of-the-registered-worker"


@pytest.fixture
def worker(worker_credential):
    from tasks_app import tokens
    from workers_app.models import Worker

    return Worker.objects.create(
        name="node-1",
        hostname="node-1.example",
        capacity=2,
        labels=["linux"],
        credential_hash=tokens.digest(worker_credential),
    )


@pytest.fixture
def task():
    from tasks_app.models import Task

    return Task.objects.create(name="answer", command='python3 -c "print(6*7)"')


# --- real processes --------------------------------------------------------------


@pytest.fixture
def master(request, tmp_path) -> Iterator[Master]:
    """A real server; `@pytest.mark.master_env(NAME="value")` overrides settings."""
    marker = request.node.get_closest_marker("master_env")
    overrides = marker.kwargs if marker else {}
    server = Master.launch(tmp_path / "master", **{**FAST_SETTINGS, **overrides})
    yield server
    server.release()


@pytest.fixture
def proxy(master) -> Iterator[CuttableProxy]:
    relay = CuttableProxy(master.port)
    yield relay
    relay.close()


@pytest.fixture
def start_agent(master, tmp_path) -> Iterator[Callable[..., Agent]]:
    """Start a real agent process; the same name reuses its state dir (a restart)."""
    agents: list[Agent] = []
    enrollment = master.manage("enrollment-token", "--auto-approve")

    def start(
        name: str = "agent-1",
        capacity: int = 2,
        labels: str = "",
        wait_online: bool = True,
        server: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Agent:
        agent = spawn_agent(
            server or master.url,
            enrollment,
            tmp_path,
            name=name,
            capacity=capacity,
            labels=labels,
            extra=extra,
            log_path=tmp_path / f"agent-{name}-{len(agents)}.log",
        )
        agents.append(agent)
        if wait_online:
            wait_for(lambda: master.worker_state(name) == "online", what=f"agent {name} online")
            assert agent.proc.poll() is None, f"agent exited: {agent.log()}"
        return agent

    yield start
    for agent in agents:
        agent.stop()


# --- process state ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_process_state():
    """A server process keeps a little state in memory (the dispatch board, who
    was heard from, the consumers it serves); each test starts with none."""
    from tasks_app import clock
    from workers_app import delivery, dispatch, liveness

    clock.set_now(None)
    dispatch.board = dispatch.Board()
    liveness.SEEN.clear()
    liveness._flushed.clear()
    delivery.LOCAL.clear()
    yield
