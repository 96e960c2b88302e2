"""Indexes for the runs list's search (tasks_app.history): every filter pages
newest first by (created_at, id).

run_name_prefix is PostgreSQL's only: a prefix LIKE on UPPER(task_name) uses a
btree only with text_pattern_ops (the database's collation is rarely "C"), an
operator class SQLite does not know. SQLite reads its million runs in id order
anyway; the performance target is PostgreSQL's.
"""

from django.conf import settings
from django.db import migrations, models

NAME_INDEX = "run_name_prefix"


def create_name_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {NAME_INDEX} ON tasks_app_run "
            "(UPPER(task_name::text) text_pattern_ops)"
        )


def drop_name_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {NAME_INDEX}")


class Migration(migrations.Migration):
    dependencies = [
        ("tasks_app", "0013_ins_overview_indexes"),
        ("workers_app", "0003_trusted_workers"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        # Replaced by run_status_created, which also serves a count by status.
        migrations.RemoveIndex(model_name="run", name="run_status_id"),
        migrations.AddIndex(
            model_name="attempt",
            index=models.Index(fields=["worker_name", "run"], name="attempt_worker_name_run"),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["-created_at", "-id"], name="run_created"),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["status", "-created_at", "-id"], name="run_status_created"),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["task", "-created_at", "-id"], name="run_task_created"),
        ),
        migrations.RunPython(create_name_index, drop_name_index, elidable=False),
    ]
