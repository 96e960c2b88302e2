"""The pause banner shown on every page while the scheduler is paused."""

from tasks_app.models import Run, SchedulerState


def scheduler_state(request) -> dict:
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    state = SchedulerState.objects.filter(pk=1, paused=True).first()
    if state is None:
        return {"scheduler_paused": False}
    return {
        "scheduler_paused": True,
        "scheduler_state": state,
        "runs_still_running": Run.objects.filter(status=Run.Status.RUNNING).count(),
    }
