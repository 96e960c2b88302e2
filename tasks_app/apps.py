from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Tasks and runs"

    def ready(self) -> None:
        from django.db.models.signals import pre_delete

        from tasks_app import trigger_api
        from tasks_app.models import Task, remember_deleted_task

        # Admin's bulk delete sends it per task too.
        pre_delete.connect(remember_deleted_task, sender=Task, dispatch_uid="remember_deleted_task")
        from tasks_app.writer import writer

        writer.register("trigger", trigger_api.apply_triggers, order=40)
