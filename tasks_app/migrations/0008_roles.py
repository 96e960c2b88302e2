"""The three roles (tasks_app.roles) as groups with their permissions.

Accounts that exist already keep what they could do: before roles every
logged-in account could do everything but Django admin, so staff accounts
become admins and the others operators. Superusers are admins anyway.
API tokens can expire.
"""

from django.db import migrations, models


def create_roles(apps, schema_editor):
    from tasks_app import roles

    alias = schema_editor.connection.alias
    roles.sync_groups(apps, using=alias)
    group = apps.get_model("auth", "Group").objects.using(alias)
    users = apps.get_model("auth", "User").objects.using(alias).filter(is_superuser=False)
    admin, operator = group.get(name=roles.ADMIN), group.get(name=roles.OPERATOR)
    for user in users:
        user.groups.add(admin if user.is_staff else operator)


class Migration(migrations.Migration):
    dependencies = [
        ("tasks_app", "0007_shards_and_merge"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="task",
            options={
                "ordering": ["name"],
                "permissions": [
                    ("view_scheduler", "Read tasks, runs, output and workers"),
                    ("operate_scheduler", "Create, edit, run, cancel, retry tasks; drain workers"),
                    ("administer_scheduler", "Enroll, approve, revoke workers; pause; manage users"),
                ],
            },
        ),
        migrations.AddField(
            model_name="apitoken",
            name="expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(create_roles, migrations.RunPython.noop),
    ]
