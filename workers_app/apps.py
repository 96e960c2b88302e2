from django.apps import AppConfig


class WorkersAppConfig(AppConfig):
    name = "workers_app"
    verbose_name = "Workers"

    def ready(self) -> None:
        from django.db.models.signals import post_save, pre_delete

        from tasks_app import routing
        from tasks_app.signals import stop_requested, work_queued
        from tasks_app.writer import writer
        from workers_app import dispatch, liveness, peers, reports
        from workers_app.directory import WorkerDirectory
        from workers_app.models import Worker

        work_queued.connect(dispatch.on_work_queued, dispatch_uid="workers_app.dispatch")
        # Other server processes may have agents with free slots for it.
        work_queued.connect(peers.on_work_queued, dispatch_uid="workers_app.peers")
        stop_requested.connect(dispatch.on_stop_requested, dispatch_uid="workers_app.stop")
        # Pinned and broadcast runs name workers: tasks_app asks through this.
        routing.register(WorkerDirectory())
        pre_delete.connect(
            liveness.on_worker_deleted, sender=Worker, dispatch_uid="workers_app.del"
        )
        post_save.connect(liveness.on_worker_saved, sender=Worker, dispatch_uid="workers_app.save")
        # What the writer applies for agents, in this order within a batch: a
        # hello before anything that connection reports, a socket's close last.
        writer.register("hello", liveness.hello_many, order=0)
        writer.register("agent", reports.apply_messages, order=10)
        writer.register("draining", _each(liveness.agent_draining), order=20)
        writer.register("disconnect", _each(liveness.disconnected_many), order=30)
        writer.register_followup("dispatch", dispatch.run_pass)


def _each(apply):
    """A writer handler for a function of the whole list that answers nothing."""

    def handler(payloads):
        apply(payloads)
        return [None] * len(payloads)

    return handler
