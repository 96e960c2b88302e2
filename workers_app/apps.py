from django.apps import AppConfig


class WorkersAppConfig(AppConfig):
    name = "workers_app"
    verbose_name = "Workers"

    def ready(self) -> None:
        from tasks_app.signals import stop_requested, work_queued
        from workers_app import dispatch

        work_queued.connect(dispatch.on_work_queued, dispatch_uid="workers_app.dispatch")
        stop_requested.connect(dispatch.on_stop_requested, dispatch_uid="workers_app.stop")

        from django.db.models.signals import pre_delete

        from workers_app import liveness
        from workers_app.models import Worker

        pre_delete.connect(
            liveness.on_worker_deleted, sender=Worker, dispatch_uid="workers_app.del"
        )
