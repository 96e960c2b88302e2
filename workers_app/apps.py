from django.apps import AppConfig


class WorkersAppConfig(AppConfig):
    name = "workers_app"
    verbose_name = "Workers"

    def ready(self) -> None:
        from tasks_app.signals import stop_requested, work_queued
        from workers_app import dispatch

        work_queued.connect(dispatch.on_work_queued, dispatch_uid="workers_app.dispatch")
        stop_requested.connect(dispatch.on_stop_requested, dispatch_uid="workers_app.stop")
