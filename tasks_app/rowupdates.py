"""Per-row UPDATEs of many rows as one `executemany`.

The ORM's `update()` sets the same values on every row it matches, and
`bulk_update()` builds a CASE per field per row (slow to compile, and not
conditional). Results, starts and run states differ per row and must stay
conditional (only a row still in the expected state moves), so the hot paths
use this: one prepared statement, a parameter row per model row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from django.db import connection, models


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
    primary key. Values are adapted by their model field, as the ORM would.
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
    # The field that adapts each value, in the order the values come in a row.
    adapters = [
        field
        for field, sql in zip(fields, assignments.values(), strict=True)
        for _ in range(sql.count("%s"))
    ]
    sql = f"UPDATE {quote(meta.db_table)} SET {sets} WHERE {quote(meta.pk.column)} = %s"
    if where:
        sql += f" AND ({where})"
    params = [
        [
            *(
                field.get_db_prep_save(value, connection)
                for field, value in zip(adapters, row[:-1], strict=True)
            ),
            row[-1],
            *where_params,
        ]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
        return cursor.rowcount


def in_list(column: str, values: Sequence[str]) -> tuple[str, list[str]]:
    """SQL `column IN (%s, ...)` and its parameters, for update_rows' `where`."""
    return f"{connection.ops.quote_name(column)} IN ({', '.join(['%s'] * len(values))})", list(
        values
    )
