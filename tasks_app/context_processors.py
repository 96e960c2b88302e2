"""What every page shows: the pause banner, and the buttons the user's role allows."""

from tasks_app import roles
from tasks_app.models import Run, SchedulerState


def role(request) -> dict:
    """`role`, and `can_operate` / `can_admin` for hiding what a role cannot use."""
    user = getattr(request, "user", None)
    current = roles.role_of(user)
    return {
        "role": current,
        "can_operate": roles.allows(user, roles.OPERATOR),
        "can_admin": roles.allows(user, roles.ADMIN),
    }


def scheduler_state(request) -> dict:
    if not roles.allows(getattr(request, "user", None), roles.VIEWER):
        return {}
    state = SchedulerState.objects.filter(pk=1, paused=True).first()
    if state is None:
        return {"scheduler_paused": False}
    return {
        "scheduler_paused": True,
        "scheduler_state": state,
        "runs_still_running": Run.objects.filter(status=Run.Status.RUNNING).count(),
    }
