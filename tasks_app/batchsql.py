"""SQL for the hot paths, which apply many events at once.

`update_rows`: per-row UPDATEs of many rows as one `executemany`. The ORM's
`update()` sets the same values on every row it matches, and `bulk_update()`
builds a CASE per field per row (slow to compile, and not conditional).
Results, starts and run states differ per row and must stay conditional (only
a row still in the expected state moves): one prepared statement, a parameter
row per model row.

`insert_rows`: many rows in one multi-row INSERT ... RETURNING their ids.

Both adapt values the way the ORM stores them, but once per field rather
than through the ORM's per-value preparation (which is most of the cost of
a small `bulk_create`).

`select`: the rows of a raw SELECT, for the few reads that run on every
batch. The ORM spends ~200 microseconds compiling a small query (measured:
213 us against 28 us raw for the same eight-row read); `table()`, `column()`,
`marks()`, `for_update()`, `aware()` and `json_value()` do what it would.

`atomic`: a transaction, or, inside one, a part of it without a savepoint.
A batch function called by the writer is one step of the writer's
transaction; if it fails the writer rolls the whole batch back and applies
each job alone, so a savepoint per step (two statements) buys nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.db import connection, models, transaction

atomic = functools.partial(transaction.atomic, savepoint=False)


def _adapter(field: models.Field) -> Callable[[Any], Any]:
    """How the ORM turns a value of this field into a database parameter."""
    # connection.ops at call time: the thread's own connection, whoever asks.
    if isinstance(field, models.DateTimeField):
        return lambda value: connection.ops.adapt_datetimefield_value(value)
    if isinstance(field, models.JSONField):
        return lambda value: connection.ops.adapt_json_value(value, field.encoder)
    if isinstance(
        field,
        models.BooleanField
        | models.IntegerField
        | models.CharField
        | models.TextField
        | models.FloatField
        | models.ForeignKey,
    ):
        return _same
    return lambda value: field.get_db_prep_save(value, connection)


def _same(value: Any) -> Any:
    return value


def insert_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Sequence],
    *,
    skip_conflicts_by: str | None = None,
) -> list[int | None]:
    """INSERT rows holding values of these fields (the others get their
    defaults, computed once); their primary keys, in order.

    With `skip_conflicts_by` (one of `fields`, whose value is distinct in
    every row), a row that breaks a unique constraint is not inserted, and
    its key is None: ON CONFLICT DO NOTHING returns only the rows it
    inserted, which that field tells apart.
    """
    if not rows:
        return []
    sql, adapters, rest = _insert_plan(model, tuple(fields), skip_conflicts_by)
    defaults = [adapt(field.get_default()) for field, adapt in rest]
    width = len(adapters) + len(rest)
    # Within SQLite's 32,766 parameters per statement.
    size = max(1, 30_000 // width)
    ids: list[int] = []
    with connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            params = [
                value
                for row in chunk
                for value in (*(a(v) for a, v in zip(adapters, row, strict=True)), *defaults)
            ]
            # RETURNING gives the ids in the order of the VALUES, as bulk_create
            # relies on too (SQLite 3.35+, PostgreSQL).
            cursor.execute(sql % ", ".join([f"({', '.join(['%s'] * width)})"] * len(chunk)), params)
            if skip_conflicts_by is None:
                ids += [row[0] for row in cursor.fetchall()]
            else:
                key = fields.index(skip_conflicts_by)
                inserted = {value: pk for pk, value in cursor.fetchall()}
                ids += [inserted.get(row[key]) for row in chunk]
    return ids


@functools.cache
def _insert_plan(model: type[models.Model], fields: tuple[str, ...], skip_conflicts_by=None):
    meta = model._meta
    quote = connection.ops.quote_name
    given = [meta.get_field(name) for name in fields]
    rest = [f for f in meta.concrete_fields if not f.primary_key and f not in given]
    columns = ", ".join(quote(f.column) for f in [*given, *rest])
    returning = quote(meta.pk.column)
    conflict = ""
    if skip_conflicts_by is not None:
        # Any unique constraint, partial ones included (SQLite 3.24+, PostgreSQL).
        conflict = " ON CONFLICT DO NOTHING"
        returning += f", {quote(meta.get_field(skip_conflicts_by).column)}"
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES %s{conflict} RETURNING {returning}"
    )
    return sql, [_adapter(f) for f in given], [(f, _adapter(f)) for f in rest]


def update_rows(
    model: type[models.Model],
    assignments: Mapping[str, str],
    rows: Iterable[Sequence],
    *,
    where: str = "",
    where_params: Sequence = (),
) -> int:
    """For each row: UPDATE model SET <assignments> WHERE pk = row[-1] [AND where].

    `assignments` maps a field name to its SQL with a `%s` for each of the
    row's values it takes (usually just "%s"; e.g. "COALESCE(%s, started_at,
    %s)" takes two); each row holds the values in that order, then the
    primary key.
    `where` may name columns and hold `%s` for `where_params`, the same for
    every row. Returns how many rows moved, in all.
    """
    rows = list(rows)
    if not rows:
        return 0
    meta = model._meta
    quote = connection.ops.quote_name
    fields = [meta.get_field(name) for name in assignments]
    sets = ", ".join(
        f"{quote(field.column)} = {sql}"
        for field, sql in zip(fields, assignments.values(), strict=True)
    )
    # How each value is adapted, in the order the values come in a row.
    adapters = [
        _adapter(field)
        for field, sql in zip(fields, assignments.values(), strict=True)
        for _ in range(sql.count("%s"))
    ]
    sql = f"UPDATE {quote(meta.db_table)} SET {sets} WHERE {quote(meta.pk.column)} = %s"
    if where:
        sql += f" AND ({where})"
    params = [
        [
            *(adapt(value) for adapt, value in zip(adapters, row[:-1], strict=True)),
            row[-1],
            *where_params,
        ]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
        return cursor.rowcount


def select(sql: str, params: Sequence = ()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[models.Model], name: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(name).column)


def marks(values: Sequence) -> str:
    """The placeholders of an IN (...) list of these values."""
    return ", ".join(["%s"] * len(values))


def for_update(of: str = "", skip_locked: bool = False) -> str:
    """Row locks until commit where the database has them (PostgreSQL); SQLite's
    IMMEDIATE transaction holds the whole database's write lock instead."""
    if not connection.features.has_select_for_update:
        return ""
    return f" FOR UPDATE{f' OF {of}' if of else ''}{' SKIP LOCKED' if skip_locked else ''}"


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """A datetime read raw: SQLite hands it back naive, in UTC as Django stores it."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def json_value(value: Any) -> Any:
    """A JSON column read raw: text from SQLite, decoded already by psycopg."""
    return json.loads(value) if isinstance(value, str | bytes) else value
