from django.db import migrations, models


def names_from_tokens(apps, schema_editor):
    """The names of existing secret variables, where this server can still
    decrypt them (a token under a lost key stays without names)."""
    from tasks_app import secret_env
    from tasks_app.exceptions import SecretsUnreadable

    Task = apps.get_model("tasks_app", "Task")
    changed = []
    for task in Task.objects.exclude(secret_env="").only("pk", "secret_env"):
        try:
            task.secret_env_keys = sorted(secret_env.decrypt(task.secret_env))
        except SecretsUnreadable:
            continue
        changed.append(task)
    Task.objects.bulk_update(changed, ["secret_env_keys"], batch_size=500)


class Migration(migrations.Migration):
    dependencies = [
        ("tasks_app", "0010_audit_entries"),
    ]

    operations = [
        migrations.AddField(
            model_name="task",
            name="secret_env_keys",
            field=models.JSONField(blank=True, default=list, editable=False),
        ),
        migrations.RunPython(names_from_tokens, migrations.RunPython.noop),
    ]
