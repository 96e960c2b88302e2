"""Move an install from its SQLite file into PostgreSQL, every row as it is.

`dumpdata`/`loaddata` would do it in principle, but not here: the JSON
serializer cuts times to milliseconds (attempts' times and durations are
kept to the microsecond), loaddata writes a row at a time with an UPDATE
before each INSERT (370 rows/s on the shared 2-core development machine: 9 minutes for the
200,000 rows of 100,000 runs, which this copy moves in about 2), and
PostgreSQL's text cannot hold NUL, which a command's output may contain.
So rows are read through the models from the SQLite file and written with
bulk inserts, ids included, in one transaction on the target; sequences are
then set past the highest ids, as loaddata does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from django.apps import apps
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

from scheduler_site.exceptions import CopyRefused
from tasks_app import logs
from workers_app import servers
from workers_app.models import Server

SOURCE = "sqlite_source"
# What a NUL character becomes (PostgreSQL text and jsonb cannot hold one), as
# in output stored on PostgreSQL in the first place.
NUL_REPLACEMENT = logs.NUL_REPLACEMENT
# PostgreSQL takes at most 65,535 parameters in one statement.
MAX_PARAMETERS = 60_000
READ_CHUNK = 2_000


@dataclass
class Copied:
    """Rows copied per model label, and how many of them had NULs replaced."""

    rows: dict[str, int] = field(default_factory=dict)
    nul_rows: dict[str, int] = field(default_factory=dict)
    # Rows with a text longer than its column allows (SQLite does not enforce
    # the length; older versions stored some reasons whole), cut to fit.
    cut_rows: dict[str, int] = field(default_factory=dict)


def open_source(path: Path) -> None:
    """Register the SQLite file as a second database for this process."""
    if not path.is_file():
        raise CopyRefused(f"{path} does not exist or is not a file")
    configured = connections.configure_settings(
        {
            DEFAULT_DB_ALIAS: dict(connections.settings[DEFAULT_DB_ALIAS]),
            SOURCE: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)},
        }
    )
    connections.settings[SOURCE] = configured[SOURCE]


def copied_models() -> list[type[models.Model]]:
    """Every table of the install, the many-to-many tables included, but the
    live-servers table: its rows are running processes, which enter themselves."""
    return [
        model
        for model in apps.get_models(include_auto_created=True)
        if model._meta.managed
        and not model._meta.proxy
        and model._meta.label != "workers_app.Server"
    ]


def check_source() -> None:
    """No server may be running on the SQLite file: what it wrote after the
    copy's snapshot would be lost."""
    now = timezone.now()
    live = [
        server for server in Server.objects.using(SOURCE).all() if servers.is_alive(server, now)
    ]
    if live:
        raise CopyRefused(
            f"a server is still running on the SQLite file ({live[0].name}, serving"
            f" {live[0].address or '?'}); pause the scheduler, stop the server, then copy"
        )


def check_target() -> None:
    """The target must be PostgreSQL, migrated like the source, and empty."""
    target = connections[DEFAULT_DB_ALIAS]
    if target.vendor != "postgresql":
        raise CopyRefused(
            "the target is not PostgreSQL: set DATABASE_URL (or DATABASE_URL_FILE) to it"
        )
    source_migrations = set(MigrationRecorder(connections[SOURCE]).applied_migrations())
    target_migrations = set(MigrationRecorder(target).applied_migrations())
    if source_migrations != target_migrations:
        missing = sorted(f"{app}.{name}" for app, name in target_migrations - source_migrations)
        extra = sorted(f"{app}.{name}" for app, name in source_migrations - target_migrations)
        raise CopyRefused(
            "the two databases are not migrated alike; run `manage.py migrate` on both with"
            f" this code first (only in PostgreSQL: {', '.join(missing) or 'none'};"
            f" only in SQLite: {', '.join(extra) or 'none'})"
        )
    # Content types, permissions and the role groups (tasks_app.roles) are made
    # by migrate itself; they are replaced below.
    made_by_migrate = {ContentType, Permission, Group, Group.permissions.through}
    used = [
        model._meta.label
        for model in copied_models()
        if model not in made_by_migrate and model.objects.using(DEFAULT_DB_ALIAS).exists()
    ]
    if used:
        verb = "has" if len(used) == 1 else "have"
        raise CopyRefused(
            f"the PostgreSQL database is not empty ({', '.join(used)} {verb} rows); copy into"
            " a new database"
        )


def _scrub(value: object) -> tuple[object, bool]:
    """value with every NUL replaced, in strings and inside JSON values."""
    if isinstance(value, str):
        return (value.replace("\x00", NUL_REPLACEMENT), True) if "\x00" in value else (value, False)
    if isinstance(value, list):
        items = [_scrub(item) for item in value]
        return [item for item, _ in items], any(changed for _, changed in items)
    if isinstance(value, dict):
        pairs = [(_scrub(k), _scrub(v)) for k, v in value.items()]
        changed = any(kc or vc for (_, kc), (_, vc) in pairs)
        return {k: v for (k, _), (v, _) in pairs}, changed
    return value, False


def _batches(model: type[models.Model], size: int) -> Iterator[tuple[list[models.Model], int, int]]:
    """The source's rows in id order, in lists of `size`, with how many had a
    NUL and how many a text too long for its column."""
    fields = [
        f for f in model._meta.concrete_fields if isinstance(f, models.CharField | models.TextField)
    ] + [f for f in model._meta.concrete_fields if isinstance(f, models.JSONField)]
    bounded = [
        f for f in model._meta.concrete_fields if isinstance(f, models.CharField) and f.max_length
    ]
    batch: list[models.Model] = []
    scrubbed = cut = 0
    rows = model._base_manager.using(SOURCE).order_by("pk").iterator(chunk_size=READ_CHUNK)
    for row in rows:
        touched = False
        for f in fields:
            value, changed = _scrub(getattr(row, f.attname))
            if changed:
                setattr(row, f.attname, value)
                touched = True
        scrubbed += touched
        long = [f for f in bounded if len(getattr(row, f.attname) or "") > f.max_length]
        for f in long:
            setattr(row, f.attname, getattr(row, f.attname)[: f.max_length])
        cut += bool(long)
        if model._meta.label == "workers_app.Worker":
            _disconnected(row)
        batch.append(row)
        if len(batch) == size:
            yield batch, scrubbed, cut
            batch, scrubbed, cut = [], 0, 0
    if batch:
        yield batch, scrubbed, cut


def _disconnected(worker) -> None:
    """A worker as its agent's next hello will find it: no socket (the old
    server's channels mean nothing to the new one), offline until then."""
    worker.channel_name = worker.server = ""
    if worker.state in ("online", "draining"):
        worker.state = "offline"


@contextmanager
def _stored_times_kept(everything: list[type[models.Model]]) -> Iterator[None]:
    """bulk_create calls each field's pre_save, which sets auto_now and
    auto_now_add times to now: a copy must keep the stored ones (a task's
    updated_at). This process does nothing else meanwhile."""
    fields = [
        f
        for model in everything
        for f in model._meta.concrete_fields
        if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
    ]
    saved = [(f, f.auto_now, f.auto_now_add) for f in fields]
    for f in fields:
        f.auto_now = f.auto_now_add = False
    try:
        yield
    finally:
        for f, auto_now, auto_now_add in saved:
            f.auto_now, f.auto_now_add = auto_now, auto_now_add


def copy_all(progress: Callable[[str, int], None] = lambda label, rows: None) -> Copied:
    """Copy every row of the source into the (checked) target, in one transaction
    on each side: a consistent snapshot of the SQLite file, all or nothing in
    PostgreSQL."""
    copied = Copied()
    everything = copied_models()
    with (
        _stored_times_kept(everything),
        transaction.atomic(using=SOURCE),
        transaction.atomic(using=DEFAULT_DB_ALIAS),
    ):
        # migrate made its own content types, permissions and role groups, maybe
        # under other ids; the source's replace them, so that every reference to
        # them holds.
        Group.objects.using(DEFAULT_DB_ALIAS).all().delete()
        Permission.objects.using(DEFAULT_DB_ALIAS).all().delete()
        ContentType.objects.using(DEFAULT_DB_ALIAS).all().delete()
        for model in everything:
            size = max(1, MAX_PARAMETERS // len(model._meta.concrete_fields))
            label = model._meta.label
            copied.rows[label] = copied.nul_rows[label] = copied.cut_rows[label] = 0
            for batch, scrubbed, cut in _batches(model, size):
                model._base_manager.using(DEFAULT_DB_ALIAS).bulk_create(batch, batch_size=size)
                copied.rows[label] += len(batch)
                copied.nul_rows[label] += scrubbed
                copied.cut_rows[label] += cut
            progress(label, copied.rows[label])
        # New rows must not take ids the copied ones hold (loaddata does the same).
        target = connections[DEFAULT_DB_ALIAS]
        with target.cursor() as cursor:
            for sql in target.ops.sequence_reset_sql(no_style(), everything):
                cursor.execute(sql)
    ContentType.objects.clear_cache()
    return copied
