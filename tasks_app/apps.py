from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    name = "tasks_app"
    verbose_name = "Tasks and runs"

    def ready(self) -> None:
        from tasks_app import trigger_api
        from tasks_app.writer import writer

        writer.register("trigger", trigger_api.apply_triggers, order=40)
