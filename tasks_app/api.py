"""JSON API for tasks and runs. Translation only: rules live in lifecycle/forms.

Each view declares its operations (tasks_app.apispec.Operation) in its
`api_view`: they check its requests and make the published document.
"""

from django.db import transaction
from django.http import HttpResponse, JsonResponse
from django.utils.http import urlencode

from scheduler_site.links import absolute_url
from tasks_app import (
    audit,
    audit_history,
    history,
    lifecycle,
    results,
    schemas,
    serializers,
    trigger_api,
)
from tasks_app.apispec import Operation, query_param
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
    error,
    form_errors,
)
from tasks_app.models import Event, Run, SchedulerState, Task
from tasks_app.roles import ADMIN, OPERATOR, VIEWER
from tasks_app.validators import MAX_ID
from tasks_app.writer import writer


def _task_form(payload: dict, instance: Task | None = None) -> TaskForm:
    # Fields left out keep their current value (update) or the default (create),
    # so a script that does not know about a field never resets it. The id and
    # times of a task's own JSON sent back are read-only: the form ignores them.
    payload = {**serializers.task_json(instance or Task()), **payload}
    return TaskForm(data=payload, instance=instance)


def _limit(params) -> int:
    raw = params.get("limit") or ""
    if not raw:
        return schemas.PAGE_LIMIT_DEFAULT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise history.InvalidFilter("limit must be a whole number")
    limit = int(raw)
    if not 1 <= limit <= schemas.PAGE_LIMIT_MAX:
        raise history.InvalidFilter(f"limit must be between 1 and {schemas.PAGE_LIMIT_MAX}")
    return limit


def _older_page_url(request, query: dict, before: int | None, limit: int) -> str | None:
    """`next` of a newest-first keyset page: the same filters, older than `before`."""
    if not before:
        return None
    return _next_url(request, {**query, "before": before, "limit": limit})


def _next_url(request, query: dict) -> str:
    """The absolute URL of the next page, so that a script can fetch it as it is
    (on SCHEDULER_PUBLIC_URL when set, else the request's scheme and Host)."""
    return absolute_url(request, f"{request.path}?{urlencode(query)}")


def _after(params) -> int | None:
    raw = params.get("after") or ""
    if not raw:
        return None
    # Strict like history.parse_filters: ASCII digits that fit a database integer.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 1 <= int(raw) <= MAX_ID):
        raise history.InvalidFilter(f"after must be a positive whole number, not {raw!r}")
    return int(raw)


TASK_NOT_FOUND = (404,)


@api_view(
    {
        "GET": Operation(
            "List tasks",
            {200: schemas.page_of(schemas.TASK, "Tasks in creation order, a page at a time.")},
            description="Oldest first, keyset-paginated by id: follow `next` until it is null.",
            query=(
                schemas.id_param("after", "only tasks with a larger id (what `next` sets)"),
                schemas.LIMIT,
            ),
            role=VIEWER,
        ),
        "POST": Operation(
            "Create a task",
            {201: schemas.TASK},
            body=schemas.TASK_CREATE,
            description="Fields left out take their defaults. 400 `invalid fields` when the "
            "body does not match the schema, `invalid task` when the form refuses it "
            "(a name in use, a command shlex cannot split); nothing is created.",
            role=OPERATOR,
        ),
    }
)
def tasks(request):
    if request.method == "POST":
        form = _task_form(request.payload)
        if not form.is_valid():
            raise BadRequest("invalid task", form_errors(form))
        with transaction.atomic():
            task = form.save()
            audit.record(request, "task.create", task, audit.created(audit.task_state(task)))
        return JsonResponse(serializers.task_json(task), status=201)
    try:
        after, limit = _after(request.GET), _limit(request.GET)
    except history.InvalidFilter as exc:
        return error(400, str(exc))
    rows = Task.objects.order_by("id")
    if after:
        rows = rows.filter(pk__gt=after)
    page = list(rows[: limit + 1])
    next_url = None
    if len(page) > limit:
        page = page[:limit]
        next_url = _next_url(request, {"after": page[-1].pk, "limit": limit})
    return JsonResponse({"results": [serializers.task_json(t) for t in page], "next": next_url})


_UPDATE = Operation(
    "Change a task",
    {200: schemas.TASK_WITH_NEXT_RUNS},
    body=schemas.TASK_UPDATE,
    description="Fields left out keep their value (PUT and PATCH alike).",
    errors=TASK_NOT_FOUND,
    role=OPERATOR,
)


@api_view(
    {
        "GET": Operation(
            "One task",
            {200: schemas.TASK_WITH_NEXT_RUNS},
            description="With `next_runs`: its next 5 fire times in its time zone, each "
            "flagged when it falls in a DST gap or a repeated hour.",
            errors=TASK_NOT_FOUND,
            role=VIEWER,
        ),
        "PUT": _UPDATE,
        "PATCH": _UPDATE,
        "DELETE": Operation(
            "Delete a task",
            {204: None},
            description="Its runs stay readable: they keep the task's id and name, "
            "with `task_deleted` true.",
            errors=TASK_NOT_FOUND,
            role=OPERATOR,
        ),
    }
)
def task_detail(request, pk: int):
    task = Task.objects.filter(pk=pk).first()
    if task is None:
        return error(404, f"no task with id {pk}")
    if request.method == "DELETE":
        # Runs keep their snapshot and task name; their task link becomes null.
        with transaction.atomic():
            audit.record(request, "task.delete", task)
            task.delete()
        return HttpResponse(status=204)
    if request.method in ("PUT", "PATCH"):
        before = audit.task_state(task)
        form = _task_form(request.payload, instance=task)
        if not form.is_valid():
            raise BadRequest("invalid task", form_errors(form))
        with transaction.atomic():
            task = form.save()
            audit.record(request, "task.update", task, audit.diff(before, audit.task_state(task)))
    return JsonResponse(serializers.task_json(task, with_next_runs=True))


@api_view(
    {
        "POST": Operation(
            "Run a task",
            {201: schemas.RUN},
            body=schemas.RUN_PARAMS,
            body_optional=True,
            description="Queues one run. Optional run parameters: `env` laid over the "
            "task's environment, `args` appended to its command line. 409 when the task "
            "is disabled. The API's hot path: under `manage.py serve` a Channels "
            "consumer serves it.",
            errors=(404, 409),
            served_by_trigger_api=True,
            role=OPERATOR,
        )
    }
)
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


@api_view(
    {
        "GET": Operation(
            "List runs",
            {200: schemas.page_of(schemas.RUN, "Runs newest first, a page at a time.")},
            description="Newest first, keyset-paginated by id: follow `next` until it is "
            "null. Attempts come without their output.",
            query=(
                schemas.id_param("task", "only the runs of this task (deleted or not)"),
                query_param("status", {"enum": list(Run.Status.values)}, "only runs in this state"),
                schemas.id_param("before", "only runs with a smaller id (what `next` sets)"),
                schemas.LIMIT,
            ),
            role=VIEWER,
        ),
        "POST": Operation(
            "Start many runs of one task",
            {201: schemas.results_of(schemas.RUN)},
            body=schemas.BULK_TRIGGER,
            description="In one request and one transaction; the runs come back in order, "
            "each queued. 400 (nothing started) for any bad entry, with errors keyed "
            "`runs[i].env`; 404 for an unknown task, 409 for a disabled one.",
            errors=(404, 409),
            served_by_trigger_api=True,
            role=OPERATOR,
        ),
    }
)
def runs(request):
    if request.method == "POST":
        return _trigger(request, None)
    try:
        filters, limit = history.parse_filters(request.GET), _limit(request.GET)
    except history.InvalidFilter as exc:
        return error(400, str(exc))
    page = history.runs_page(limit=limit, **filters)
    kept = {k: v for k, v in filters.items() if k != "before"}
    next_url = _older_page_url(request, kept, page.next_before, limit)
    return JsonResponse(
        {
            "results": [
                serializers.run_json(r, with_output=False, attempts=r.attempt_list)
                for r in page.runs
            ],
            "next": next_url,
        }
    )


@api_view(
    {
        "GET": Operation(
            "One run",
            {200: schemas.RUN_WITH_OUTPUT},
            description="Its status and attempts, with their output. A sharded run's "
            "attempts carry output only for the shard `shard` names (the merge is shard "
            "N), so the answer stays one shard's size at 1,000 shards.",
            query=(
                query_param(
                    "shard",
                    {"type": "integer", "minimum": 0, "maximum": schemas.MAX_SHARDS},
                    "a sharded run: the shard whose attempts come with their output",
                ),
            ),
            errors=(404,),
            role=VIEWER,
        )
    }
)
def run_detail(request, pk: int):
    raw = request.GET.get("shard", "")
    if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
        return error(400, f"shard must be a shard's index (a whole number), not {raw[:40]!r}")
    run = Run.objects.prefetch_related("attempts").filter(pk=pk).first()
    if run is None:
        return error(404, f"no run with id {pk}")
    history.mark_deleted_tasks([run])
    shard = int(raw) if raw else None
    return JsonResponse(serializers.run_json(run, with_output=True, shard=shard))


@api_view(
    {
        "GET": Operation(
            "A run's events",
            {200: schemas.page_of(schemas.EVENT, "The run's events, oldest first.")},
            description="Every state change of the run and its attempts (queued, assigned, "
            "started, finished, retried, ...), oldest first, keyset-paginated by id: follow "
            "`next` until it is null, or pass the last id seen as `after` to catch up.",
            query=(
                schemas.id_param("after", "only events with a larger id (what `next` sets)"),
                schemas.LIMIT,
            ),
            errors=(404,),
            role=VIEWER,
        )
    }
)
def run_events(request, pk: int):
    try:
        after, limit = _after(request.GET), _limit(request.GET)
    except history.InvalidFilter as exc:
        return error(400, str(exc))
    if not Run.objects.filter(pk=pk).exists():
        return error(404, f"no run with id {pk}")
    rows = Event.objects.filter(run_id=pk, id__gt=after or 0).order_by("id")
    page = list(rows[: limit + 1])
    next_url = None
    if len(page) > limit:
        page = page[:limit]
        next_url = _next_url(request, {"after": page[-1].pk, "limit": limit})
    return JsonResponse({"results": [serializers.event_json(e) for e in page], "next": next_url})


def _run_response(run: Run, status: int = 200) -> JsonResponse:
    """A run as it is now in the database, with its attempts, without output."""
    run = Run.objects.prefetch_related("attempts").get(pk=run.pk)
    history.mark_deleted_tasks([run])
    return JsonResponse(serializers.run_json(run, with_output=False), status=status)


def _run_or_404(pk: int):
    return Run.objects.filter(pk=pk).first()


@api_view(
    {
        "POST": Operation(
            "Cancel a run",
            {200: schemas.RUN},
            description="409 when it has already finished.",
            errors=(404, 409),
            role=OPERATOR,
        )
    }
)
def run_cancel(request, pk: int):
    run = _run_or_404(pk)
    if run is None:
        return error(404, f"no run with id {pk}")
    try:
        with transaction.atomic():
            run = lifecycle.cancel_run(run, by=request.user.get_username())
            audit.record(request, "run.cancel", run)
    except RunNotCancellable as exc:
        return error(409, str(exc))
    return _run_response(run)


@api_view(
    {
        "POST": Operation(
            "Retry a run",
            {201: schemas.RUN},
            description="A new run of the same snapshot and parameters; 409 unless the "
            "run has finished.",
            errors=(404, 409),
            role=OPERATOR,
        )
    }
)
def run_retry(request, pk: int):
    run = _run_or_404(pk)
    if run is None:
        return error(404, f"no run with id {pk}")
    try:
        with transaction.atomic():
            retry = lifecycle.retry_run(run, user=request.user)
            audit.record(request, "run.retry", run, {"retry": retry.pk})
    except RunNotRetryable as exc:
        return error(409, str(exc))
    return _run_response(retry, status=201)


@api_view(
    {
        "GET": Operation(
            "A run's result",
            {200: None},
            description="The whole result as text, streamed: the merge command's stdout, "
            "or the shards' stdout in shard order. 409 until the run has succeeded.",
            errors=(404, 409),
            content_type="text/plain",
            role=VIEWER,
        )
    }
)
def run_result(request, pk: int):
    run = _run_or_404(pk)
    if run is None:
        return error(404, f"no run with id {pk}")
    ids = results.result_attempt_ids(run)
    if ids is None:
        return error(409, f"run {pk} is {run.status}; a result exists once it has succeeded")
    return results.streamed(request, results.iter_stdout(ids), filename=f"run-{pk}-result.txt")


@api_view({"GET": Operation("The scheduler's state", {200: schemas.SCHEDULER}, role=VIEWER)})
def scheduler(request):
    return JsonResponse(serializers.scheduler_json())


@api_view(
    {
        "POST": Operation(
            "Pause the scheduler",
            {200: schemas.SCHEDULER},
            description="No new work is dispatched; running work finishes.",
            role=ADMIN,
        )
    }
)
def scheduler_pause(request):
    with transaction.atomic():
        SchedulerState.set_paused(True, by=request.user.get_username())
        audit.record(request, "scheduler.pause", audit.SCHEDULER)
    return JsonResponse(serializers.scheduler_json())


@api_view({"POST": Operation("Resume the scheduler", {200: schemas.SCHEDULER}, role=ADMIN)})
def scheduler_resume(request):
    with transaction.atomic():
        SchedulerState.set_paused(False)
        audit.record(request, "scheduler.resume", audit.SCHEDULER)
    return JsonResponse(serializers.scheduler_json())


@api_view(
    {
        "GET": Operation(
            "The audit log",
            {200: schemas.page_of(schemas.AUDIT_ENTRY, "Entries newest first, a page at a time.")},
            description="Who changed what, when and from where: every change, login, failed "
            "login and logout. Newest first, keyset-paginated by id: follow `next` until it "
            "is null. `since` and `until` take a date (2026-01-31; `until` includes the day) "
            "or a time with its offset.",
            query=(
                query_param("actor", {"type": "string", "maxLength": 200}, "who: part of it"),
                query_param(
                    "action",
                    {"type": "string", "pattern": audit_history.ACTION_RE.pattern},
                    "an action (task.update) or a kind of action (task)",
                ),
                query_param("target", {"type": "string", "maxLength": 200}, "part of the target"),
                query_param("since", {"type": "string"}, "entries at or after this date or time"),
                query_param(
                    "until", {"type": "string"}, "entries before this time (or through this day)"
                ),
                schemas.id_param("before", "only entries with a smaller id (what `next` sets)"),
                schemas.LIMIT,
            ),
            role=ADMIN,
        )
    }
)
def audit_log(request):
    try:
        filters, limit = audit_history.parse_filters(request.GET), _limit(request.GET)
    except history.InvalidFilter as exc:
        return error(400, str(exc))
    page = audit_history.entries_page(limit=limit, **filters)
    kept = audit_history.query_string_values({k: v for k, v in filters.items() if k != "before"})
    next_url = _older_page_url(request, kept, page.next_before, limit)
    return JsonResponse(
        {"results": [serializers.audit_json(e) for e in page.entries], "next": next_url}
    )
