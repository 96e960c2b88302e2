"""Settings for the scheduler master, driven by environment variables.

With nothing set it runs the embedded default: SQLite (WAL) in the data dir
and the in-memory channel layer, one server process. Every variable is
listed in the README.
"""

import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from scheduler_site.envconfig import (
    env_bool,
    env_database,
    env_dir,
    env_hosts,
    env_list,
    env_log_level,
    env_number,
    env_redis,
    env_str,
    env_time_zone,
    env_url,
    make_private,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = env_dir("SCHEDULER_DATA_DIR", BASE_DIR / ".scheduler")
if DATA_DIR == BASE_DIR:
    # Its static/ (STATIC_ROOT) would be the project's own static files: Django's
    # staticfiles.E002, which names neither the variable nor the fix. Checked
    # before anything (the secret key) is written into it.
    raise ImproperlyConfigured(
        f"SCHEDULER_DATA_DIR: {DATA_DIR} is the project directory; choose a directory of its"
        " own, e.g. the default .scheduler/"
    )
# The database, the secret key, the admin's password and the local agents'
# credentials live here: nobody else's to read.
make_private(DATA_DIR, 0o700)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept in the data dir."""
    configured = env_str("SECRET_KEY", default_text="a key generated once into the data dir")
    if configured:
        return configured
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("SCHEDULER_DEBUG", False)
ALLOWED_HOSTS = env_hosts("SCHEDULER_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("SCHEDULER_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "template_partials",
    "tasks_app",
    "workers_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last: see its docstring (one thread hop per request instead of two per middleware).
    "scheduler_site.middleware.OneThreadHop",
]

ROOT_URLCONF = "scheduler_site.urls"
ASGI_APPLICATION = "scheduler_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tasks_app.context_processors.scheduler_state",
            ],
        },
    },
]

SQLITE_DATABASE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": DATA_DIR / "db.sqlite3",
    "OPTIONS": {
        # IMMEDIATE: a transaction takes the write lock when it begins, so two
        # writers queue on busy_timeout instead of failing with "database is
        # locked" when a read lock cannot be upgraded.
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    },
    # A file, as in production (WAL: readers never wait for the writer), not
    # the shared-cache in-memory database, whose table locks fail at once.
    "TEST": {"NAME": str(DATA_DIR / "test-db.sqlite3")},
}
# DATABASE_URL: PostgreSQL (psycopg 3) for several server processes. A request
# opens a connection and closes it at its end; SCHEDULER_DB_POOL_SIZE > 0 opts in
# to psycopg's pool instead (faster, but every thread that touched the database
# holds one of its connections until it closes it: the test suite's threads
# exhausted a pool of 8, so it is off by default).
# The writer's thread keeps one of the pool's for the server's life.
POSTGRES_DATABASE = env_database(
    "DATABASE_URL",
    pool_size=int(env_number("SCHEDULER_DB_POOL_SIZE", 0, minimum=0, integer=True)),
)
DATABASES = {"default": POSTGRES_DATABASE or SQLITE_DATABASE}
if not POSTGRES_DATABASE:
    # Created here with 0600 rather than by SQLite with the umask's 0644; its
    # -wal and -shm files take the database file's permissions.
    make_private(SQLITE_DATABASE["NAME"], 0o600)

# REDIS_URL: channels_redis, so that server processes reach each other's agent
# sockets; unset, the in-memory layer of one process. SCHEDULER_REDIS_PREFIX
# keeps installs (or test runs) sharing one Redis apart.
REDIS_URL = env_redis("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        # Above channels_redis's 5 s blocking pop: redis-py 8 made
                        # 5 s the default read timeout, which would fail every idle
                        # receive (django/channels_redis#422), yet a dead Redis
                        # must still be noticed.
                        "socket_timeout": 15,
                        "socket_connect_timeout": 5,
                    }
                ],
                "prefix": env_str("SCHEDULER_REDIS_PREFIX", "scheduler"),
                # A frame for an agent whose server died is dropped after this;
                # the agent's next hello is reconciled from the database anyway.
                "expiry": 30,
                "capacity": 1000,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Several `serve` processes are only correct on PostgreSQL + Redis
# (workers_app.servers refuses a second one otherwise).
SCALE_OUT = bool(POSTGRES_DATABASE and REDIS_URL)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_time_zone("SCHEDULER_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "tasks:list"
LOGOUT_REDIRECT_URL = "login"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "tasks_app": {"level": env_log_level("SCHEDULER_LOG_LEVEL", "INFO")},
        "workers_app": {"level": env_log_level("SCHEDULER_LOG_LEVEL", "INFO")},
    },
}

# --- Scheduler ---------------------------------------------------------------
# How often agents heartbeat, and how long a silent worker stays online.
SCHEDULER_HEARTBEAT_S = env_number("SCHEDULER_HEARTBEAT_S", 5.0, minimum=0.1)
# 60 s so that a master restart of up to 30 s (an upgrade with migrations)
# kills no running command: agents self-fence after max(60 - 2*5, 60/2) = 50 s
# and, while commands run, try to reconnect at least every 50/10 = 5 s. The
# price: the work of a node that really died waits ~60 s for its retry.
SCHEDULER_LOST_AFTER_S = env_number("SCHEDULER_LOST_AFTER_S", 60.0, minimum=0.3)
# An assignment the agent has not accepted by then goes back to the queue.
SCHEDULER_ACCEPT_TIMEOUT_S = env_number("SCHEDULER_ACCEPT_TIMEOUT_S", 10.0, minimum=0.1)
# The master's own timeout backstop fires this long after a task's timeout.
SCHEDULER_TIMEOUT_GRACE_S = env_number("SCHEDULER_TIMEOUT_GRACE_S", 30.0, minimum=0.0)
# Agents that lose the master for longer than SCHEDULER_LOST_AFTER_S kill
# their commands, so a retry elsewhere never overlaps a zombie.
SCHEDULER_SELF_FENCE = env_bool("SCHEDULER_SELF_FENCE", True)
# How often the in-process service looks for work (dispatch backstop, lost workers).
SCHEDULER_TICK_S = env_number("SCHEDULER_TICK_S", 1.0, minimum=0.05)
# Priority aging: each point of a task's priority (0-100) is worth this much
# waiting in the queue (tasks_app.models.queue_at): a bigger step makes priorities
# stronger, 0 turns them off (plain first in, first out).
SCHEDULER_PRIORITY_AGING_S = env_number("SCHEDULER_PRIORITY_AGING_S", 60.0, minimum=0.0)
# Output kept per attempt; the rest is counted and dropped, with a marker.
SCHEDULER_LOG_LIMIT_BYTES = int(
    env_number("SCHEDULER_LOG_LIMIT_BYTES", 4 * 1024 * 1024, minimum=1024, integer=True)
)
# Largest websocket frame the master accepts from an agent.
SCHEDULER_MAX_FRAME_BYTES = int(
    env_number("SCHEDULER_MAX_FRAME_BYTES", 1024 * 1024, minimum=64 * 1024, integer=True)
)
# How long an enrollment token minted from the dashboard stays valid.
SCHEDULER_ENROLLMENT_TTL_HOURS = env_number("SCHEDULER_ENROLLMENT_TTL_HOURS", 24.0, minimum=0.01)
SCHEDULER_PAGE_SIZE = int(env_number("SCHEDULER_PAGE_SIZE", 50, minimum=1, integer=True))
# The address agents are told to use in the "add a worker" command.
SCHEDULER_PUBLIC_URL = env_url("SCHEDULER_PUBLIC_URL")
