"""JSON API for tasks and runs. Translation only: rules live in lifecycle/forms."""

from django.http import HttpResponse, JsonResponse
from django.urls import reverse
from django.utils.http import urlencode

from tasks_app import history, lifecycle, serializers, trigger_api
from tasks_app.exceptions import (
    RunNotCancellable,
    RunNotRetryable,
    RunTooLarge,
    TaskDisabled,
    TaskNotFound,
)
from tasks_app.forms import TaskForm
from tasks_app.jsonapi import (
    BadRequest,
    Denied,
    api_view,
    authenticate,
    error,
    form_errors,
    json_body,
    wrong_types,
)
from tasks_app.models import TASK_FIELDS, Run, SchedulerState, Task
from tasks_app.writer import writer


def _task_form(payload: dict, instance: Task | None = None) -> TaskForm:
    unknown = sorted(set(payload) - set(TASK_FIELDS) - {"id"})
    if unknown:
        raise BadRequest("unknown fields", {name: ["Unknown field."] for name in unknown})
    wrong = wrong_types(payload, TASK_FIELDS)
    if wrong:
        raise BadRequest("invalid fields", wrong)
    # Fields left out keep their current value (update) or the default (create),
    # so a script that does not know about a field never resets it.
    payload = {**serializers.task_json(instance or Task()), **payload}
    return TaskForm(data=payload, instance=instance)


@api_view(["GET", "POST"])
def tasks(request):
    if request.method == "POST":
        form = _task_form(json_body(request))
        if not form.is_valid():
            raise BadRequest("invalid task", form_errors(form))
        return JsonResponse(serializers.task_json(form.save()), status=201)
    return JsonResponse(
        {"results": [serializers.task_json(t) for t in Task.objects.order_by("id")]}
    )


@api_view(["GET", "PUT", "PATCH", "DELETE"])
def task_detail(request, pk: int):
    task = Task.objects.filter(pk=pk).first()
    if task is None:
        return error(404, f"no task with id {pk}")
    if request.method == "DELETE":
        # Runs keep their snapshot and task name; their task link becomes null.
        task.delete()
        return HttpResponse(status=204)
    if request.method in ("PUT", "PATCH"):
        form = _task_form(json_body(request), instance=task)
        if not form.is_valid():
            raise BadRequest("invalid task", form_errors(form))
        task = form.save()
    return JsonResponse(serializers.task_json(task))


@api_view(["POST"], public=True)
def task_run(request, pk: int):
    return _trigger(request, pk)


def _trigger(request, task_id: int | None) -> JsonResponse:
    """Start runs; under ASGI a POST is served by trigger_api's consumers instead,
    which share this parsing, this writer job and these answers."""
    try:
        trigger = trigger_api.trigger_from(request, request.body, task_id)
        created = writer.submit_sync("trigger", trigger)
    except (Denied, BadRequest, TaskNotFound, TaskDisabled, RunTooLarge) as exc:
        status, data, headers = trigger_api.failure(exc)
        response = JsonResponse(data, status=status)
        for name, value in headers:
            response[name] = value
        return response
    return JsonResponse(trigger_api.answer(created, single=task_id is not None), status=201)


@api_view(["GET", "POST"], public=True)
def runs(request):
    if request.method == "POST":
        return _trigger(request, None)
    denied = authenticate(request)
    if denied is not None:
        return denied
    try:
        filters = history.parse_filters(request.GET)
        limit = int(request.GET.get("limit") or 50)
    except (history.InvalidFilter, ValueError) as exc:
        return error(
            400,
            str(exc) if isinstance(exc, history.InvalidFilter) else "limit must be a whole number",
        )
    if not 1 <= limit <= 200:
        return error(400, "limit must be between 1 and 200")
    page = history.runs_page(limit=limit, **filters)
    next_url = None
    if page.next_before:
        query = {
            **{k: v for k, v in filters.items() if k != "before"},
            "before": page.next_before,
            "limit": limit,
        }
        next_url = f"{reverse('api:runs')}?{urlencode(query)}"
    return JsonResponse(
        {
            "results": [
                serializers.run_json(r, with_output=False, attempts=r.attempt_list)
                for r in page.runs
            ],
            "next": next_url,
        }
    )


@api_view(["GET"])
def run_detail(request, pk: int):
    run = Run.objects.prefetch_related("attempts").filter(pk=pk).first()
    if run is None:
        return error(404, f"no run with id {pk}")
    history.mark_deleted_tasks([run])
    return JsonResponse(serializers.run_json(run, with_output=True))


def _run_response(run: Run, status: int = 200) -> JsonResponse:
    """A run as it is now in the database, with its attempts, without output."""
    run = Run.objects.prefetch_related("attempts").get(pk=run.pk)
    history.mark_deleted_tasks([run])
    return JsonResponse(serializers.run_json(run, with_output=False), status=status)


def _run_or_404(pk: int):
    return Run.objects.filter(pk=pk).first()


@api_view(["POST"])
def run_cancel(request, pk: int):
    run = _run_or_404(pk)
    if run is None:
        return error(404, f"no run with id {pk}")
    try:
        run = lifecycle.cancel_run(run, by=request.user.get_username())
    except RunNotCancellable as exc:
        return error(409, str(exc))
    return _run_response(run)


@api_view(["POST"])
def run_retry(request, pk: int):
    run = _run_or_404(pk)
    if run is None:
        return error(404, f"no run with id {pk}")
    try:
        retry = lifecycle.retry_run(run, user=request.user)
    except RunNotRetryable as exc:
        return error(409, str(exc))
    return _run_response(retry, status=201)


@api_view(["GET"])
def scheduler(request):
    return JsonResponse(serializers.scheduler_json())


@api_view(["POST"])
def scheduler_pause(request):
    SchedulerState.set_paused(True, by=request.user.get_username())
    return JsonResponse(serializers.scheduler_json())


@api_view(["POST"])
def scheduler_resume(request):
    SchedulerState.set_paused(False)
    return JsonResponse(serializers.scheduler_json())
