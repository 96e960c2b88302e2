"""JSON API for workers: enrollment (public, token-gated) and listing."""

from django import forms
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import JsonResponse

from tasks_app import audit, results, roles, shards, tokens
from tasks_app import schemas as task_schemas
from tasks_app.apispec import Operation
from tasks_app.jsonapi import BadRequest, api_view, error, form_errors
from tasks_app.roles import ADMIN, OPERATOR, VIEWER
from tasks_app.validators import clean_labels
from workers_app import liveness, registration, schemas, serializers
from workers_app.auth import bearer
from workers_app.exceptions import EnrollmentRefused
from workers_app.models import EnrollmentToken, Worker


class RegistrationForm(forms.Form):
    token = forms.CharField(max_length=200)
    name = forms.RegexField(
        regex=r"^[A-Za-z0-9_.@-]{1,200}$",
        error_messages={"invalid": "Use 1-200 letters, digits, '.', '_', '@' or '-'."},
    )
    hostname = forms.CharField(max_length=255, required=False)
    capacity = forms.IntegerField(min_value=1, max_value=schemas.MAX_CAPACITY)
    labels = forms.Field(required=False)

    def clean_labels(self):
        return clean_labels(self.cleaned_data.get("labels"))


@api_view(
    {
        "POST": Operation(
            "Register a worker",
            {201: schemas.ENROLLED},
            body=schemas.REGISTRATION,
            description="Public, gated by the enrollment token in the body (403 for an "
            "unknown, expired, used up or revoked one, or the name of an existing worker "
            "that an admin has not allowed to re-enroll). The agent does this once; the "
            "credential is shown only here. The worker is `pending` (no work) until an admin "
            "approves it, unless the token auto-approves.",
            errors=(403,),
            public=True,
        )
    }
)
def register(request):
    form = RegistrationForm(data=request.payload)
    if not form.is_valid():
        raise BadRequest("invalid registration", form_errors(form))
    data = form.cleaned_data
    try:
        with transaction.atomic():
            worker, credential = registration.register(
                data["token"],
                name=data["name"],
                hostname=data["hostname"],
                capacity=data["capacity"],
                labels=data["labels"],
            )
            _record_enrollment(request, worker, data["token"])
    except EnrollmentRefused as exc:
        return error(403, str(exc))
    return JsonResponse(
        {"worker": serializers.worker_json(worker, busy=0), "credential": credential}, status=201
    )


@api_view(
    {"GET": Operation("List workers", {200: task_schemas.results_of(schemas.WORKER)}, role=VIEWER)}
)
def workers(request):
    # Explicitly: Meta.ordering does not apply to a query with GROUP BY (the count).
    rows = Worker.objects.with_busy_slots().order_by("name")
    return JsonResponse({"results": [serializers.worker_json(w, busy=w.busy) for w in rows]})


@api_view(
    {
        "POST": Operation(
            "Approve a pending worker",
            {200: schemas.WORKER},
            body=schemas.APPROVAL,
            body_optional=True,
            description="A newly enrolled worker is `pending` and gets no work until an "
            "admin approves it. The labels and capacity given here (default: what its agent "
            "asked for) are what dispatch uses; its agent cannot widen them later. 409 if it "
            "is not pending (approved already, or revoked).",
            errors=(404, 409),
            role=ADMIN,
        )
    }
)
def worker_approve(request, pk: int):
    worker = Worker.objects.filter(pk=pk).first()
    if worker is None:
        return error(404, f"no worker with id {pk}")
    body = request.payload or {}
    try:
        labels = clean_labels(body.get("labels", worker.requested_labels))
    except ValidationError as exc:
        raise BadRequest("invalid approval", {"labels": exc.messages}) from None
    capacity = body.get("capacity", worker.requested_capacity or worker.capacity)
    with transaction.atomic():
        if not registration.approve(worker, user=request.user, labels=labels, capacity=capacity):
            return error(409, f"worker {worker.name} is not pending approval")
        audit.record(request, "worker.approve", worker, approval_changes(labels, capacity))
    worker = Worker.objects.filter(pk=pk).with_busy_slots().get()
    return JsonResponse(serializers.worker_json(worker, busy=worker.busy))


ACTIONS = {
    "drain": Worker.State.DRAINING,
    "resume": Worker.State.ONLINE,
    "disable": Worker.State.DISABLED,
    "enable": Worker.State.ONLINE,
}
# Operators drain and resume (maintenance); taking a worker out of service
# altogether, or back, is for admins, as enrolling and revoking are.
ACTION_ROLES = {"drain": OPERATOR, "resume": OPERATOR, "disable": ADMIN, "enable": ADMIN}


def approval_changes(labels: list[str], capacity: int) -> dict:
    return {"state": ["pending", "approved"], "labels": labels, "capacity": capacity}


def record_state_change(request, worker: Worker, action: str) -> None:
    """Apply a drain/resume/disable/enable and record it, with the state before and after."""
    with transaction.atomic():
        # Read under the row's lock: a hello or a reap between the read and the
        # change would otherwise make the recorded [old, new] pair wrong.
        old = Worker.objects.select_for_update().values_list("state", flat=True).get(pk=worker.pk)
        liveness.apply_state(worker, ACTIONS[action])
        worker.refresh_from_db(fields=["state"])
        audit.record(request, f"worker.{action}", worker, {"state": [old, worker.state]})


def _record_enrollment(request, worker: Worker, raw_token: str) -> None:
    # The agent has no user: the enrollment token it used is who.
    token = EnrollmentToken.objects.filter(token_hash=tokens.digest(raw_token)).first()
    actor = f"enrollment token {token.pk}" if token else "enrollment token"
    # What the agent asked for; an admin decides on approval (or the token auto-approved).
    changes = {
        "hostname": worker.hostname,
        "capacity": worker.requested_capacity,
        "labels": worker.requested_labels,
        "state": worker.state,
    }
    audit.record(request, "worker.enroll", worker, changes, actor=actor)


@api_view(
    {
        "POST": Operation(
            "Drain, resume, disable or enable a worker",
            {200: schemas.WORKER},
            description="drain: it takes no new work, and finishes what it has; resume "
            "and enable: it takes work again; disable: it takes none until enabled. "
            "Drain and resume need the operator role, disable and enable the admin role.",
            path_params={"action": {"enum": list(ACTIONS)}},
            errors=(404,),
            role=OPERATOR,
        )
    }
)
def worker_action(request, pk: int, action: str):
    if action not in ACTIONS:
        return error(404, f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    roles.check(request.user, ACTION_ROLES[action])
    worker = Worker.objects.filter(pk=pk).first()
    if worker is None:
        return error(404, f"no worker with id {pk}")
    record_state_change(request, worker, action)
    worker = Worker.objects.filter(pk=pk).with_busy_slots().get()
    return JsonResponse(serializers.worker_json(worker, busy=worker.busy))


@api_view(
    {
        "GET": Operation(
            "Every shard's output, for the merge that reads them",
            {200: None},
            description="The stdout of the successful attempt of each shard of the run "
            "whose merge attempt `pk` is, in shard order, each as a line `<index> <byte "
            "length>` and then that many bytes: what a merge's agent fetches, in one "
            "request. Authenticated like the one-shard form below; 403 also while a "
            "shard has not succeeded.",
            errors=(401, 403),
            content_type="application/octet-stream",
            public=True,
        )
    }
)
def shard_outputs(request, pk: int):
    worker = registration.authenticate(bearer(request.headers.get("Authorization", "")))
    if worker is None:
        response = error(401, "a worker's credential is required")
        response["WWW-Authenticate"] = "Bearer"
        return response
    attempt_ids = shards.merge_inputs(worker.pk, pk)
    if attempt_ids is None:
        return error(403, f"worker {worker.name} does not hold merge attempt {pk}")
    response = results.streamed(
        request, results.iter_framed_stdout(attempt_ids), filename=f"merge-{pk}-inputs"
    )
    response["Content-Type"] = "application/octet-stream"
    return response


@api_view(
    {
        "GET": Operation(
            "A shard's output, for the merge that reads it",
            {200: None},
            description="The stdout of the successful attempt of shard `index` of the run "
            "whose merge attempt `pk` is. For agents: authenticated with the worker's "
            "credential (`Authorization: Bearer wkr_…`), and only the worker holding that "
            "merge attempt (assigned or running) may read it: 401 for a bad credential, "
            "403 for any other worker, attempt or index.",
            errors=(401, 403),
            content_type="text/plain",
            path_params={"index": {"minimum": 0}},
            public=True,
        )
    }
)
def shard_output(request, pk: int, index: int):
    worker = registration.authenticate(bearer(request.headers.get("Authorization", "")))
    if worker is None:
        response = error(401, "a worker's credential is required")
        response["WWW-Authenticate"] = "Bearer"
        return response
    attempt_id = shards.merge_input(worker.pk, pk, index)
    if attempt_id is None:
        return error(
            403, f"worker {worker.name} does not hold merge attempt {pk} (or no shard {index})"
        )
    return results.streamed(
        request, results.iter_stdout([attempt_id]), filename=f"shard-{index}.txt"
    )
