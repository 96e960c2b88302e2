"""Settings for the scheduler master, driven by environment variables.

With nothing set it runs the embedded default: SQLite (WAL) in the data dir
and the in-memory channel layer, one server process. Every variable is
listed in the README.
"""

import datetime as dt
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from scheduler_site.envconfig import (
    env_bool,
    env_database,
    env_dir,
    env_email_list,
    env_header,
    env_hosts,
    env_list,
    env_log_level,
    env_number,
    env_proxy_ssl_header,
    env_redis,
    env_str,
    env_time_zone,
    env_token,
    env_url,
    env_url_list,
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

# --- HTTPS (README: "Production settings") -------------------------------------
# SCHEDULER_HTTPS: people and agents reach the site over https only (usually
# through a proxy that ends TLS): cookies are sent over TLS only, and a plain
# http request that reaches Django is redirected (nginx redirects port 80
# itself; this catches a proxy that does not).
SCHEDULER_HTTPS = env_bool("SCHEDULER_HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = SCHEDULER_HTTPS
# The header a proxy that ends TLS sets to "https" (nginx.conf sets
# X-Forwarded-Proto). Only when that proxy overwrites it: a client could send it
# otherwise and pass for https.
SECURE_PROXY_SSL_HEADER = env_proxy_ssl_header("SCHEDULER_PROXY_SSL_HEADER")
if SECURE_SSL_REDIRECT and not SECURE_PROXY_SSL_HEADER:
    # The server itself speaks plain http (daphne without TLS): behind a proxy
    # every request would look like http and be redirected to https forever.
    raise ImproperlyConfigured(
        "SCHEDULER_HTTPS=true needs SCHEDULER_PROXY_SSL_HEADER (e.g. X-Forwarded-Proto), the"
        " header the proxy that ends TLS sets: without it every request looks like plain http"
        " and would be redirected to https again and again"
    )
# HSTS: browsers then refuse plain http to this host for that long. Start low
# (300) and raise it (31536000, a year) once https is known to work.
SECURE_HSTS_SECONDS = int(env_number("SCHEDULER_HSTS_SECONDS", 0, minimum=0, integer=True))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SCHEDULER_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SCHEDULER_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = [
    # "HSTS preload is not set": submitting a domain to the browsers' preload
    # list is a decision about the whole registered domain (which the scheduler
    # is usually a host of), hard to undo, and not the scheduler's to make; an
    # operator who wants it sets SCHEDULER_HSTS_PRELOAD.
    "security.W021",
]

INSTALLED_APPS = [
    "daphne",
    "scheduler_site.apps.SchedulerAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "axes",
    "django_htmx",
    "template_partials",
    "tasks_app",
    "workers_app",
]

MIDDLEWARE = [
    # First: /healthz, /readyz and /metrics skip the host check and the https
    # redirect (load balancers and Prometheus reach a server by its address,
    # over plain http); see its docstring.
    "scheduler_site.middleware.Probes",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # The newest event's id for a page's live socket to catch up from (tasks_app.live).
    "tasks_app.live.LiveSince",
    # After authentication, as django-axes asks: turns a lockout into its page.
    "axes.middleware.AxesMiddleware",
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
                "tasks_app.context_processors.role",
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
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

# --- Login rate limiting (django-axes) -------------------------------------------
# First: axes counts failures and refuses a locked-out login before any password
# is checked. It needs the request, which every login form passes; API tokens
# and agents' credentials never go through authenticate().
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(env_number("SCHEDULER_LOGIN_FAILURE_LIMIT", 5, minimum=1, integer=True))
AXES_COOLOFF_TIME = dt.timedelta(
    minutes=env_number("SCHEDULER_LOGIN_COOLOFF_MINUTES", 15.0, minimum=0.1)
)
# Two locks, each on its own: a username guessed at from many addresses, and an
# address guessing many usernames.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
# The client's address: the connection's, or behind a proxy that overwrites it,
# this header's (README: "Production settings"); never a header a client chose.
SCHEDULER_CLIENT_IP_HEADER = env_header("SCHEDULER_CLIENT_IP_HEADER")
AXES_CLIENT_IP_CALLABLE = "scheduler_site.clientip.client_ip"
# Only when the admin lists them; no access log of every login (the audit has its own).
AXES_DISABLE_ACCESS_LOG = True
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_time_zone("SCHEDULER_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
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
# Largest HTTP request body (the API's limit): past it the answer is 413, before
# the body is read (scheduler_site.bodylimit). Django's own limit says the same.
SCHEDULER_MAX_BODY_BYTES = int(
    env_number("SCHEDULER_MAX_BODY_BYTES", 1024 * 1024, minimum=64 * 1024, integer=True)
)
DATA_UPLOAD_MAX_MEMORY_SIZE = SCHEDULER_MAX_BODY_BYTES
# Largest websocket frame the master accepts from an agent.
SCHEDULER_MAX_FRAME_BYTES = int(
    env_number("SCHEDULER_MAX_FRAME_BYTES", 1024 * 1024, minimum=64 * 1024, integer=True)
)
# How long an enrollment token minted from the dashboard stays valid.
SCHEDULER_ENROLLMENT_TTL_HOURS = env_number("SCHEDULER_ENROLLMENT_TTL_HOURS", 24.0, minimum=0.01)
SCHEDULER_PAGE_SIZE = int(env_number("SCHEDULER_PAGE_SIZE", 50, minimum=1, integer=True))
# The address agents are told to use in the "add a worker" command.
SCHEDULER_PUBLIC_URL = env_url("SCHEDULER_PUBLIC_URL")

# --- Metrics and health (README, "Metrics and health") -----------------------
# Unset: /metrics answers loopback addresses only. Set (or _FILE): it answers
# requests bearing "Authorization: Bearer <token>", from anywhere, and no others.
SCHEDULER_METRICS_TOKEN = env_token(
    "SCHEDULER_METRICS_TOKEN",
    min_length=16,
    default_text="unset: /metrics open to loopback addresses only",
)
# /readyz fails once this process's scheduler service has not finished a tick
# for this long (a tick is SCHEDULER_TICK_S; 15 s is when other servers call a
# silent one dead, workers_app.servers.SILENT_AFTER_S).
SCHEDULER_READY_SERVICE_S = env_number("SCHEDULER_READY_SERVICE_S", 15.0, minimum=0.1)

# --- Retention (tasks_app.retention; README, Retention) ------------------------
# Final runs (with their attempts and output) and events older than this many
# days are deleted by the service; 0 keeps everything.
SCHEDULER_RETENTION_DAYS = int(env_number("SCHEDULER_RETENTION_DAYS", 30, minimum=0, integer=True))
# Runs deleted per transaction, one batch per service tick.
SCHEDULER_RETENTION_BATCH = int(
    env_number("SCHEDULER_RETENTION_BATCH", 500, minimum=1, integer=True)
)

# --- Notifications (tasks_app.notify; README, Notifications) -------------------
# One webhook POST or e-mail may take this long before it counts as failed.
SCHEDULER_NOTIFY_TIMEOUT_S = env_number("SCHEDULER_NOTIFY_TIMEOUT_S", 10.0, minimum=0.1)
# Tries of one delivery in all; between them SCHEDULER_NOTIFY_BACKOFF_S, then
# four times longer each time (30 s, 2 min, 8 min, 32 min, ~2 h by default).
SCHEDULER_NOTIFY_TRIES = int(env_number("SCHEDULER_NOTIFY_TRIES", 6, minimum=1, integer=True))
SCHEDULER_NOTIFY_BACKOFF_S = env_number("SCHEDULER_NOTIFY_BACKOFF_S", 30.0, minimum=0.0)
# Queued work that no worker taking work can run (none has its labels, or none
# is online) for this long raises one alert per label set until it clears; 0: off.
SCHEDULER_STUCK_QUEUE_MINUTES = env_number("SCHEDULER_STUCK_QUEUE_MINUTES", 10.0, minimum=0.0)
# Where the operators' alerts go: comma-separated URLs (signed with the secret
# below, which they then need) and addresses.
SCHEDULER_ALERT_WEBHOOKS = env_url_list("SCHEDULER_ALERT_WEBHOOKS")
SCHEDULER_ALERT_WEBHOOK_SECRET = env_str("SCHEDULER_ALERT_WEBHOOK_SECRET")
if SCHEDULER_ALERT_WEBHOOKS and not SCHEDULER_ALERT_WEBHOOK_SECRET:
    raise ImproperlyConfigured(
        "SCHEDULER_ALERT_WEBHOOKS needs SCHEDULER_ALERT_WEBHOOK_SECRET (or _FILE): "
        "the alerts' bodies are signed with it"
    )
SCHEDULER_ALERT_EMAILS = env_email_list("SCHEDULER_ALERT_EMAILS")
# E-mail: SMTP when SCHEDULER_EMAIL_HOST is set; otherwise the messages are
# written to the server's standard output (Django's console backend), so that
# a laptop install shows what it would send instead of failing to connect.
SCHEDULER_EMAIL_HOST = env_str("SCHEDULER_EMAIL_HOST")
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend"
    if SCHEDULER_EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_HOST = SCHEDULER_EMAIL_HOST or "localhost"
EMAIL_PORT = int(env_number("SCHEDULER_EMAIL_PORT", 587, minimum=1, integer=True))
EMAIL_HOST_USER = env_str("SCHEDULER_EMAIL_USER")
EMAIL_HOST_PASSWORD = env_str("SCHEDULER_EMAIL_PASSWORD")
EMAIL_USE_TLS = env_bool("SCHEDULER_EMAIL_TLS", True)
EMAIL_TIMEOUT = SCHEDULER_NOTIFY_TIMEOUT_S
DEFAULT_FROM_EMAIL = env_str("SCHEDULER_EMAIL_FROM", "scheduler@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
