"""Dashboard pages for workers, and the agent download."""

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from scheduler_site.links import absolute_url
from tasks_app import audit, roles
from tasks_app.roles import ADMIN, OPERATOR, VIEWER, role_required
from tasks_app.validators import clean_labels
from workers_app import delivery, enrollment, protocol, registration, schemas, servers
from workers_app.api import (
    ACTION_ROLES,
    ACTIONS,
    RegistrationForm,
    approval_changes,
    record_state_change,
)
from workers_app.models import EnrollmentToken, Worker

AGENT_SOURCE = enrollment.AGENT_SOURCE


def _server_url(request) -> str:
    return absolute_url(request, "/").rstrip("/")


@require_GET
@role_required(VIEWER)
def worker_list(request):
    return _render_list(request)


def _render_list(request, **context):
    workers = list(Worker.objects.with_busy_slots().order_by("name"))
    template = "workers/list.html#worker-table" if request.htmx else "workers/list.html"
    context = {"workers": workers, "servers": _servers(workers), **context}
    if roles.allows(request.user, ADMIN):
        context["enrollment_tokens"] = EnrollmentToken.objects.select_related("created_by")[:50]
    return render(request, template, context)


def _servers(workers: list[Worker]) -> list[tuple]:
    """The live server processes, each with the workers whose sockets it serves."""
    connected: dict[str, int] = {}
    for worker in workers:
        if worker.server and worker.channel_name:
            connected[worker.server] = connected.get(worker.server, 0) + 1
    return [(server, connected.get(server.name, 0)) for server in servers.alive()]


class TokenOptionsForm(forms.Form):
    """How many agents a token may enroll, for how long, and whether they need approval."""

    max_uses = forms.IntegerField(min_value=1, max_value=100_000, required=False, initial=1)
    ttl_hours = forms.FloatField(min_value=0.01, max_value=24 * 365, required=False)
    auto_approve = forms.BooleanField(required=False)
    note = forms.CharField(max_length=200, required=False, strip=True)

    def mint(self, user, note: str) -> tuple[str, EnrollmentToken]:
        data = self.cleaned_data
        return EnrollmentToken.mint(
            note=data.get("note") or note,
            user=user,
            ttl_hours=data.get("ttl_hours"),
            max_uses=data.get("max_uses"),
            auto_approve=data.get("auto_approve", False),
        )


class AddWorkerForm(TokenOptionsForm):
    # The same rule the registration API applies, so a typed name is never refused later.
    name = forms.RegexField(
        regex=RegistrationForm.declared_fields["name"].regex,
        required=False,
        strip=True,
        error_messages={"invalid": "Use 1-200 letters, digits, '.', '_', '@' or '-'."},
    )


class ApproveForm(forms.Form):
    labels = forms.CharField(max_length=2000, required=False)
    capacity = forms.IntegerField(min_value=1, max_value=schemas.MAX_CAPACITY)

    def clean_labels(self):
        try:
            return clean_labels(self.cleaned_data.get("labels"))
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from exc


@require_POST
@role_required(ADMIN)
def worker_add(request):
    form = AddWorkerForm(request.POST)
    context = {"form": form}
    if form.is_valid():
        # Empty "uses" in the form is unlimited; the form starts at 1 (single use).
        with transaction.atomic():
            raw, token = form.mint(request.user, f"dashboard, by {request.user}")
            audit.record(request, "enrollment_token.create", token, token.options())
        server = _server_url(request)
        name = form.cleaned_data["name"]
        context |= {
            "token": raw,
            "expires_at": token.expires_at,
            "enrollment": token,
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


def _get_worker(pk: int) -> Worker:
    worker = Worker.objects.filter(pk=pk).first()
    if worker is None:
        raise Http404("No such worker.")
    return worker


@require_POST
@role_required(ADMIN)
def worker_approve(request, pk: int):
    worker = _get_worker(pk)
    form = ApproveForm(request.POST)
    if not form.is_valid():
        return _render_list(request, approve_failed=worker.pk, approve_form=form)
    labels, capacity = form.cleaned_data["labels"], form.cleaned_data["capacity"]
    with transaction.atomic():
        if registration.approve(worker, user=request.user, labels=labels, capacity=capacity):
            audit.record(request, "worker.approve", worker, approval_changes(labels, capacity))
    return _render_list(request) if request.htmx else redirect("workers:list")


@require_POST
@role_required(ADMIN)
def worker_allow_reenroll(request, pk: int):
    worker = _get_worker(pk)
    with transaction.atomic():
        if registration.allow_reenroll(worker):
            audit.record(request, "worker.allow_reenroll", worker)
        else:
            messages.error(
                request,
                f"{worker.name} is connected (or revoked): its agent has its credential, "
                "so there is nothing to re-enroll.",
            )
    return _render_list(request) if request.htmx else redirect("workers:list")


@require_POST
@role_required(ADMIN)
def token_mint(request):
    form = TokenOptionsForm(request.POST)
    context: dict = {"token_form": form}
    if form.is_valid():
        with transaction.atomic():
            raw, token = form.mint(request.user, f"dashboard, by {request.user}")
            audit.record(request, "enrollment_token.create", token, token.options())
        context |= {"new_token": raw, "new_token_row": token}
    return _render_tokens(request, context) if request.htmx else _render_list(request, **context)


@require_POST
@role_required(ADMIN)
def token_revoke(request, pk: int):
    # Only a token still unrevoked moves: revoking twice keeps the first time.
    with transaction.atomic():
        revoked = EnrollmentToken.objects.filter(pk=pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if revoked:
            audit.record(request, "enrollment_token.revoke", EnrollmentToken.objects.get(pk=pk))
    return _render_tokens(request, {}) if request.htmx else redirect("workers:list")


def _render_tokens(request, context: dict):
    context["enrollment_tokens"] = EnrollmentToken.objects.select_related("created_by")[:50]
    return render(request, "workers/list.html#enrollment-tokens", context)


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
