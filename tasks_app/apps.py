from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Tasks and runs"

    def ready(self) -> None:
        from django.apps import apps as global_apps
        from django.db.models.signals import post_delete, post_migrate, post_save, pre_delete

        from tasks_app import audit, roles

        # Logins, failed logins and logouts into the audit log.
        audit.connect_login_receivers()

        # The admin group gets the permissions of models added since its migration.
        # (flush sends it without `apps`: then the installed ones.)
        post_migrate.connect(
            lambda using, apps=None, **kw: roles.sync_groups(apps or global_apps, using),
            sender=self,
            weak=False,
            dispatch_uid="sync_role_groups",
        )

        from tasks_app import trigger_api
        from tasks_app.models import (
            Task,
            record_task_deleted,
            record_task_saved,
            remember_deleted_task,
        )

        # Admin's bulk delete sends it per task too.
        pre_delete.connect(remember_deleted_task, sender=Task, dispatch_uid="remember_deleted_task")
        post_save.connect(record_task_saved, sender=Task, dispatch_uid="record_task_saved")
        post_delete.connect(record_task_deleted, sender=Task, dispatch_uid="record_task_deleted")
        from tasks_app.writer import writer

        writer.register("trigger", trigger_api.apply_triggers, order=40)
        from tasks_app import events

        # Committed events are announced to every server's live listeners.
        writer.register_followup("events", events.publish)
        from tasks_app import logs

        # Stored output is announced to the open run pages, once per batch.
        writer.register_followup("output", logs.publish_stored)
