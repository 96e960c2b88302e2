"""Dashboard pages for workers, and the agent download."""

from pathlib import Path

from django import forms
from django.db import transaction
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from scheduler_site.links import absolute_url
from tasks_app import audit, roles
from tasks_app.roles import ADMIN, OPERATOR, VIEWER, role_required
from workers_app import delivery, enrollment, protocol, registration, servers
from workers_app.api import ACTION_ROLES, ACTIONS, RegistrationForm, record_state_change
from workers_app.models import EnrollmentToken, Worker

AGENT_SOURCE = Path(__file__).with_name("agent.py")


def _server_url(request) -> str:
    return absolute_url(request, "/").rstrip("/")


@require_GET
@role_required(VIEWER)
def worker_list(request):
    return _render_list(request)


def _render_list(request):
    workers = list(Worker.objects.with_busy_slots().order_by("name"))
    template = "workers/list.html#worker-table" if request.htmx else "workers/list.html"
    return render(request, template, {"workers": workers, "servers": _servers(workers)})


def _servers(workers: list[Worker]) -> list[tuple]:
    """The live server processes, each with the workers whose sockets it serves."""
    connected: dict[str, int] = {}
    for worker in workers:
        if worker.server and worker.channel_name:
            connected[worker.server] = connected.get(worker.server, 0) + 1
    return [(server, connected.get(server.name, 0)) for server in servers.alive()]


class AddWorkerForm(forms.Form):
    # The same rule the registration API applies, so a typed name is never refused later.
    name = forms.RegexField(
        regex=RegistrationForm.declared_fields["name"].regex,
        required=False,
        strip=True,
        error_messages={"invalid": "Use 1-200 letters, digits, '.', '_', '@' or '-'."},
    )


@require_POST
@role_required(ADMIN)
def worker_add(request):
    form = AddWorkerForm(request.POST)
    context = {"form": form}
    if form.is_valid():
        with transaction.atomic():
            raw, token = EnrollmentToken.mint(
                note=f"dashboard, by {request.user}", user=request.user
            )
            changes = {"expires_at": token.expires_at.isoformat()}
            audit.record(request, "enrollment_token.create", token, changes)
        server = _server_url(request)
        name = form.cleaned_data["name"]
        context |= {
            "token": raw,
            "expires_at": token.expires_at,
            "server": server,
            "name": name,
            "command": enrollment.agent_command(server, raw, name=name),
        }
    if request.htmx:
        return render(request, "workers/list.html#enrollment", context)
    workers = Worker.objects.with_busy_slots().order_by("name")
    return render(request, "workers/list.html", {**context, "workers": workers})


@require_POST
@role_required(ADMIN)
def worker_revoke(request, pk: int):
    worker = Worker.objects.filter(pk=pk).first()
    if worker is None:
        raise Http404("No such worker.")
    with transaction.atomic():
        registration.revoke(worker)
        audit.record(request, "worker.revoke", worker)
    # Close its live socket too; its running attempts are reaped as lost.
    delivery.send_close(worker.pk, worker.channel_name, protocol.CLOSE_REVOKED)
    return _render_list(request) if request.htmx else redirect("workers:list")


@require_POST
@role_required(OPERATOR)
def worker_state(request, pk: int, action: str):
    if action not in ACTIONS:
        raise Http404("No such action.")
    roles.check(request.user, ACTION_ROLES[action])
    worker = Worker.objects.filter(pk=pk).first()
    if worker is None:
        raise Http404("No such worker.")
    record_state_change(request, worker, action)
    return _render_list(request) if request.htmx else redirect("workers:list")


@require_GET
def agent_download(request):
    """The standalone agent, so a node needs only Python, websockets and requests."""
    return HttpResponse(AGENT_SOURCE.read_bytes(), content_type="text/x-python; charset=utf-8")
