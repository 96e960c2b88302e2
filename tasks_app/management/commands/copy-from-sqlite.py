"""`manage.py copy-from-sqlite`: move an install's history into PostgreSQL."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from scheduler_site import dbcopy
from scheduler_site.exceptions import CopyRefused


class Command(BaseCommand):
    help = (
        "Copy every row of an install's SQLite file into the empty, migrated PostgreSQL"
        " database DATABASE_URL names (stop the server first)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "sqlite",
            nargs="?",
            type=Path,
            default=Path(settings.SQLITE_DATABASE["NAME"]),
            help="The SQLite file (default: db.sqlite3 in SCHEDULER_DATA_DIR).",
        )

    def handle(self, *args, sqlite: Path, **options):
        def progress(label: str, rows: int) -> None:
            self.stdout.write(f"{label}: {rows:,} rows")

        try:
            dbcopy.open_source(sqlite.expanduser().resolve())
            dbcopy.check_source()
            dbcopy.check_target()
            copied = dbcopy.copy_all(progress)
        except CopyRefused as exc:
            raise CommandError(f"nothing copied: {exc}") from None
        total = sum(copied.rows.values())
        self.stdout.write(f"copied {total:,} rows from {sqlite}")
        for label, rows in copied.nul_rows.items():
            if rows:
                self.stdout.write(
                    f"{label}: {rows:,} rows held NUL characters, stored as U+FFFD"
                    " (PostgreSQL text cannot hold NUL)"
                )
        for label, rows in copied.cut_rows.items():
            if rows:
                self.stdout.write(
                    f"{label}: {rows:,} rows held a text longer than its column allows,"
                    " cut to fit (SQLite does not enforce the length)"
                )
