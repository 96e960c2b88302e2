"""Dashboard pages for tasks and runs. They translate; lifecycle decides."""

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import F, OuterRef, Prefetch, Q, Subquery
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from tasks_app import (
    audit,
    bulk_runs,
    charts,
    cron,
    history,
    lifecycle,
    live,
    logs,
    notify,
    output_view,
    results,
    retention,
    roles,
    shards,
    task_stats,
    timeline,
)
from tasks_app.exceptions import (
    BadSelection,
    RunNotCancellable,
    RunNotRetryable,
    RunTooLarge,
    TaskDisabled,
)
from tasks_app.forms import RunForm, TaskForm
from tasks_app.models import Attempt, DeletedTask, LogChunk, Run, SchedulerState, Task
from tasks_app.roles import ADMIN, OPERATOR, VIEWER, role_required
from tasks_app.templatetags.sched import seconds_text


def _get_task(pk: int) -> Task:
    task = Task.objects.filter(pk=pk).first()
    if task is None:
        raise Http404("No such task.")
    return task


def _get_run(pk: int) -> Run:
    run = Run.objects.filter(pk=pk).first()
    if run is None:
        raise Http404("No such run.")
    return run


def _redirect(request: HttpRequest, url: str) -> HttpResponse:
    """A full-page navigation, whether the request came from htmx or a plain form."""
    if request.htmx:
        return HttpResponseClientRedirect(url)
    return redirect(url)


# The task list's orders: ?sort=<key>, a leading "-" for descending. The
# newest run's id stands for "last run": ids grow with time and it is indexed.
TASK_SORTS = {
    "name": ("Name A-Z", (Lower("name"), "name")),
    "-name": ("Name Z-A", (Lower("name").desc(), "-name")),
    "-last_run": ("Last run, newest first", (F("last_run_id").desc(nulls_last=True), "name")),
    "last_run": ("Last run, oldest first", (F("last_run_id").asc(nulls_first=True), "name")),
    "-created": ("Created, newest first", ("-created_at", "-id")),
    "created": ("Created, oldest first", ("created_at", "id")),
}
TASK_PAGE_SIZE = 25
MAX_SEARCH = 200


@require_GET
@role_required(VIEWER)
def task_list(request):
    query = request.GET.get("q", "").strip()[:MAX_SEARCH]
    sort = request.GET.get("sort") or "name"
    if sort not in TASK_SORTS:
        messages.error(request, f"Unknown order {sort!r} ignored; sorted by name.")
        sort = "name"
    tasks = Task.objects.all()
    if query:
        tasks = tasks.filter(Q(name__icontains=query) | Q(command__icontains=query))
    # The newest run per task is one index probe on (task, -id) per task of the
    # page, in the page's one query, not a GROUP BY over the whole run history.
    newest = Run.objects.filter(task=OuterRef("pk")).order_by("-id").values("id")[:1]
    tasks = tasks.annotate(last_run_id=Subquery(newest)).order_by(*TASK_SORTS[sort][1])
    page = Paginator(tasks, TASK_PAGE_SIZE).get_page(request.GET.get("page"))
    latest = Run.objects.in_bulk([t.last_run_id for t in page if t.last_run_id], field_name="id")
    state = {key: value for key, value in (("q", query), ("sort", sort)) if value}
    if state.get("sort") == "name":
        del state["sort"]

    def page_url(number: int) -> str:
        query_string = urlencode({**state, "page": number} if number > 1 else state)
        return f"{reverse('tasks:list')}?{query_string}" if query_string else reverse("tasks:list")

    context = {
        "rows": [(task, latest.get(task.last_run_id)) for task in page],
        "page": page,
        "query": query,
        "sort": sort,
        "sorts": [(key, label) for key, (label, _) in TASK_SORTS.items()],
        "previous_url": page_url(page.previous_page_number()) if page.has_previous() else None,
        "next_url": page_url(page.next_page_number()) if page.has_next() else None,
    }
    template = "tasks/list.html#task-table" if request.htmx else "tasks/list.html"
    return render(request, template, context)


@require_GET
@role_required(VIEWER)
def task_detail(request, pk: int):
    task = Task.objects.filter(pk=pk).first()
    deleted = None if task else DeletedTask.objects.filter(pk=pk).first()
    if task is None and deleted is None:
        raise Http404("No such task.")
    if request.htmx and request.GET.get("part") == "stats":
        # The live page re-renders this region alone when runs of the task change.
        return render(request, "tasks/detail.html#task-stats", _stats_context(pk))
    try:
        before = history.parse_filters({"before": request.GET.get("before", "")}).get("before")
    except history.InvalidFilter as exc:
        messages.error(request, f"Ignored: {exc}.")
        before = None
    template = "tasks/detail.html#task-history" if request.htmx else "tasks/detail.html"
    return render(request, template, _detail_context(pk, task, deleted, before, RunForm()))


def _stats_context(pk: int) -> dict:
    strip = task_stats.recent_runs(pk)
    return {
        "task_id": pk,
        "stats": task_stats.task_stats(pk),
        "strip": strip,
        "trend": _duration_trend(strip),
    }


def _detail_context(pk: int, task, deleted, before, run_form: RunForm) -> dict:
    try:
        page = history.runs_page(
            task=pk, before=before, limit=settings.SCHEDULER_PAGE_SIZE, brief=True
        )
    except history.InvalidFilter:
        # The run the link paged from is no longer stored: the newest runs instead.
        before = None
        page = history.runs_page(task=pk, limit=settings.SCHEDULER_PAGE_SIZE, brief=True)
    here = reverse("tasks:detail", args=[pk])
    return {
        **_stats_context(pk),
        "task": task,
        "task_id": pk,
        "deleted": deleted,
        "name": task.name if task else deleted.name,
        "page": page,
        "next_runs": cron.next_runs(task) if task else [],
        "older_url": f"{here}?{urlencode({'before': page.next_before})}"
        if page.next_before
        else None,
        "newest_url": here if before else None,
        "run_form": run_form,
        "deliveries": notify.log_of_task(pk),
    }


def _duration_trend(runs: list[Run]):
    """A sparkline of the durations of those of these runs that have one."""
    points = [
        (
            run.duration.total_seconds(),
            f"#{run.pk} {run.status}: {seconds_text(run.duration.total_seconds())}",
        )
        for run in runs
        if run.duration is not None
    ]
    return charts.sparkline(points, title="Durations of its last runs", chart_id="duration-trend")


@require_http_methods(["GET", "POST"])
@role_required(OPERATOR)
def task_create(request):
    return _task_form(request, None)


@require_http_methods(["GET", "POST"])
@role_required(OPERATOR)
def task_edit(request, pk: int):
    return _task_form(request, _get_task(pk))


def _task_form(request, task: Task | None):
    form = TaskForm(request.POST or None, instance=task)
    before = audit.task_state(task) if task and request.method == "POST" else None
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            saved = form.save()
            after = audit.task_state(saved)
            if task is None:
                audit.record(request, "task.create", saved, audit.created(after))
            else:
                audit.record(request, "task.update", saved, audit.diff(before, after))
        messages.success(request, f"Task {saved.name!r} {'saved' if task else 'created'}.")
        # To the task itself: where it can be run and its history read.
        return _redirect(request, reverse("tasks:detail", args=[saved.pk]))
    template = "tasks/form.html#task-form" if request.htmx else "tasks/form.html"
    status = 400 if request.method == "POST" else 200
    # htmx does not swap 4xx responses by default; the form is meant to be swapped in.
    if request.htmx:
        status = 200
    return render(request, template, {"form": form, "task": task}, status=status)


@require_http_methods(["GET", "POST"])
@role_required(OPERATOR)
def task_delete(request, pk: int):
    task = _get_task(pk)
    if request.method == "POST":
        name = task.name
        with transaction.atomic():
            audit.record(request, "task.delete", task)
            task.delete()
        messages.success(request, f"Task {name!r} deleted; its runs stay in the history.")
        return _redirect(request, reverse("tasks:list"))
    return render(
        request, "tasks/confirm_delete.html", {"task": task, "run_count": task.runs.count()}
    )


@require_POST
@role_required(OPERATOR)
def task_run(request, pk: int):
    task = _get_task(pk)
    form = RunForm(request.POST)
    if not form.is_valid():
        # The form again with its errors, nothing started; htmx swaps only the form.
        if request.htmx:
            return render(request, "tasks/detail.html#run-form", {"task": task, "run_form": form})
        context = _detail_context(pk, task, None, None, form)
        return render(request, "tasks/detail.html", context, status=400)
    params = form.params()
    request_ = lifecycle.TriggerRequest(
        task.pk,
        Run.Trigger.MANUAL,
        request.user.pk,
        params=(params,) if params else None,
        run_at=form.cleaned_data["run_at"],
    )
    with transaction.atomic():
        [result] = lifecycle.trigger_runs([request_])
        if isinstance(result, list):
            audit.record(request, "run.trigger", task, {"runs": [run.pk for run in result]})
    if isinstance(result, TaskDisabled | RunTooLarge):
        messages.error(request, str(result))
        return _redirect(request, _back(request))
    if isinstance(result, Exception):
        raise Http404(str(result))
    return _redirect(request, reverse("tasks:run-detail", args=[result[0].pk]))


@require_POST
@role_required(OPERATOR)
def task_schedule_pause(request, pk: int):
    return _set_schedule_paused(request, pk, True)


@require_POST
@role_required(OPERATOR)
def task_schedule_resume(request, pk: int):
    return _set_schedule_paused(request, pk, False)


def _set_schedule_paused(request, pk: int, paused: bool) -> HttpResponse:
    task = _get_task(pk)
    with transaction.atomic():
        old = task.schedule_paused
        task.set_schedule_paused(paused)
        action = "task.schedule_pause" if paused else "task.schedule_resume"
        audit.record(request, action, task, {"schedule_paused": [old, paused]})
    said = "paused; the task can still be run" if paused else "resumed"
    messages.success(request, f"Schedule of {task.name!r} {said}.")
    return _redirect(request, reverse("tasks:detail", args=[pk]))


@require_GET
@role_required(VIEWER)
def run_list(request):
    """The runs, newest first, searched by every filter of tasks_app.history.

    A filter that cannot be read answers 400 with the reason above an empty
    table, never the unfiltered list: a page of runs someone believes filtered
    is one bulk *Cancel* away from cancelling the wrong ones.
    """
    problem = None
    try:
        filters = history.parse_filters(request.GET)
        page = history.runs_page(limit=settings.SCHEDULER_PAGE_SIZE, brief=True, **filters)
    except history.InvalidFilter as exc:
        problem, filters, page = str(exc), {}, history.Page(runs=[], next_before=None)
    kept = history.query_string_values({k: v for k, v in filters.items() if k != "before"})
    here = reverse("tasks:runs")
    older_url = None
    if page.next_before:
        older_url = f"{here}?{urlencode({**kept, 'before': page.next_before}, doseq=True)}"
    newest = urlencode(kept, doseq=True)
    context = {
        "page": page,
        "filters": filters,
        "problem": problem,
        # What was typed, shown again as it was (a bad value too, to be fixed).
        "typed": {
            "name": request.GET.get("name", "")[: history.MAX_TEXT_FILTER],
            "worker": request.GET.get("worker", "")[: history.MAX_TEXT_FILTER],
            "since": request.GET.get("since", "")[:40],
            "until": request.GET.get("until", "")[:40],
            "task": request.GET.get("task", "")[:20],
            "status": request.GET.getlist("status"),
            "trigger": request.GET.getlist("trigger"),
        },
        "older_url": older_url,
        "newest_url": f"{here}?{newest}" if "before" in filters else None,
        "statuses": Run.Status.values,
        "triggers": Run.Trigger.values,
        "tasks": Task.objects.order_by("name").only("id", "name"),
        # Their runs are history too, and stay findable by the task.
        "deleted_tasks": DeletedTask.objects.order_by("name"),
        "workers": _worker_names(),
        "max_bulk": bulk_runs.MAX_RUNS,
        # Only the first page follows new runs live; an older page stays put.
        "live": "before" not in filters and problem is None,
    }
    # htmx swaps only 2xx answers: the region with its error must still be swapped in.
    if request.htmx:
        return render(request, "tasks/runs.html#run-table", context)
    status = 400 if problem else 200
    return render(request, "tasks/runs.html", {**context, "kept": retention.kept()}, status=status)


def _worker_names() -> list[str]:
    """The workers' names, offered by the worker filter. Read through the
    attempt's relation: tasks_app does not import workers_app (DESIGN.md)."""
    worker = Attempt._meta.get_field("worker").related_model
    return list(worker.objects.order_by("name").values_list("name", flat=True)[:1000])


@require_POST
@role_required(OPERATOR)
def runs_cancel_many(request):
    return _bulk(request, bulk_runs.cancel)


@require_POST
@role_required(OPERATOR)
def runs_retry_many(request):
    return _bulk(request, bulk_runs.retry)


def _bulk(request, action) -> HttpResponse:
    """A bulk action on the runs checked on the list; back to the list as it was."""
    back = _back(request, reverse("tasks:runs"))
    raw = request.POST.getlist("ids")
    if not raw:
        messages.error(request, "No runs selected: check the runs to act on first.")
        return _redirect(request, back)
    try:
        ids = bulk_runs.parse_ids(raw)
    except BadSelection as exc:
        return HttpResponseBadRequest(f"Nothing done: {exc}.", content_type="text/plain")
    outcome = action(request, ids)
    said = messages.success if outcome.done else messages.warning
    said(request, outcome.message())
    return _redirect(request, back)


# How much of a result the run page shows; the rest is a download away.
RESULT_ON_PAGE_CHARS = 16 * 1024


@require_GET
@role_required(VIEWER)
def run_detail(request, pk: int):
    """A run. A sharded one (more than one shard, or a merge) shows a grid of
    its shards and the attempts and output of the one selected (?shard=N;
    the merge is shard N) instead of every attempt's: at 1,000 shards the
    live partial stays one read of the attempts and no query per shard."""
    attempts = Attempt.objects.order_by("shard_index", "try_number")
    run = (
        Run.objects.prefetch_related(Prefetch("attempts", queryset=attempts)).filter(pk=pk).first()
    )
    if run is None:
        raise Http404("No such run.")
    history.mark_deleted_tasks([run])
    deleted = DeletedTask.objects.filter(pk=run.task_id).first() if run.task_deleted else None
    context = {"run": run, "deleted_task": deleted, **_shard_context(request, run)}
    shown = [a for a in run.attempts.all() if context["selected"] in (None, a.shard_index)]
    if context["sharded"] and context["selected"] is None:
        shown = []
    if request.headers.get(live.LIVE_HEADER):
        # Re-rendered for the page's socket: the page keeps the output boxes it
        # has and gets new lines appended (tasks_app.consumers); no full re-read.
        # A box new since (another try) starts empty, from the first chunk.
        outputs = {a.pk: output_view.Shown.empty() for a in shown}
    else:
        outputs = output_view.shown_outputs([attempt.pk for attempt in shown])
    context["rows"] = [(attempt, outputs[attempt.pk]) for attempt in shown]
    context.update(timeline_context(run, context))
    if run.status == Run.Status.SUCCEEDED:
        # Only once final: read once, when the run's finish re-renders the page.
        ids = results.result_attempt_ids(run)
        text, cut = results.head(ids, RESULT_ON_PAGE_CHARS)
        # Shown like output (colours, no escape codes), downloaded as it is.
        context["result"] = (output_view.render_html([(LogChunk.Stream.STDOUT, text)]), cut)
    template = "tasks/run_detail.html#run-live" if request.htmx else "tasks/run_detail.html"
    return render(request, template, context)


def timeline_context(run: Run, context: dict) -> dict:
    """What the page's `timeline` partial shows: the run's events, one query
    (also when the live page re-renders the run's region). A
    sharded run's lines say which shard (or the merge) each is about."""
    prefixes = None
    if context.get("sharded"):
        count = context["shard_count"]
        prefixes = {
            a.pk: "merge" if a.shard_index == count else f"shard {a.shard_index}"
            for a in run.attempts.all()
        }
    lines, cut = timeline.of_run(run.pk, prefixes)
    return {"timeline": lines, "timeline_cut": cut, "timeline_max": timeline.MAX_LINES}


def _shard_context(request, run: Run) -> dict:
    definition = run.definition
    count = shards.shard_count(definition)
    sharded = count > 1 or shards.has_merge(definition)
    if not sharded:
        return {"sharded": False, "selected": None}
    latest = shards.latest_by_shard(run.attempts.all())
    cells = [(index, latest.get(index)) for index in range(count)]
    counts: dict[str, int] = {}
    for _, attempt in cells:
        state = attempt.status if attempt else "queued"
        counts[state] = counts.get(state, 0) + 1
    raw = request.GET.get("shard", "")
    selected = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 5 else None
    if selected is not None and selected > count:
        selected = None
    if not raw and run.status == Run.Status.FAILED:
        # A failed run opens on what failed it: its output is the first question.
        selected = shards.failing_index(latest, count)
    return {
        "sharded": True,
        "shard_count": count,
        "cells": cells,
        "state_counts": sorted(counts.items()),
        "merge": latest.get(count) if shards.has_merge(definition) else None,
        "has_merge": shards.has_merge(definition),
        "selected": selected,
    }


@require_GET
@role_required(VIEWER)
def run_result(request, pk: int):
    """The whole result of a run that succeeded, as a text download."""
    run = _get_run(pk)
    ids = results.result_attempt_ids(run)
    if ids is None:
        raise Http404("This run has no result: it has not succeeded.")
    return results.streamed(request, results.iter_stdout(ids), filename=f"run-{pk}-result.txt")


# What the raw output download takes: ?stream=stdout|stderr (default both, interleaved).
OUTPUT_PARAMS = {"stream"}


@require_GET
@role_required(VIEWER)
def attempt_output(request, pk: int, attempt: int):
    """One attempt's output as stored (escape codes kept, secrets masked as
    they arrived), streamed as a text file a batch of chunks at a time."""
    found = Attempt.objects.filter(pk=attempt, run_id=pk).only("pk", "shard_index", "try_number")
    found = found.first()
    if found is None:
        raise Http404("No such attempt of this run.")
    unknown = sorted(set(request.GET) - OUTPUT_PARAMS)
    if unknown:
        return HttpResponseBadRequest(
            f"Unknown parameter {unknown[0]!r}: only 'stream' is taken.",
            content_type="text/plain; charset=utf-8",
        )
    stream = request.GET.get("stream") or None
    if stream is not None and stream not in LogChunk.Stream.values:
        return HttpResponseBadRequest(
            "stream must be stdout or stderr (or left out for both).",
            content_type="text/plain; charset=utf-8",
        )
    name = f"run-{pk}-shard-{found.shard_index}-try-{found.try_number}"
    name += f"-{stream}" if stream else ""
    return results.streamed(request, logs.iter_raw(found.pk, stream), filename=f"{name}.txt")


@require_POST
@role_required(OPERATOR)
def run_cancel(request, pk: int):
    run = _get_run(pk)
    try:
        with transaction.atomic():
            lifecycle.cancel_run(run, by=request.user.get_username())
            audit.record(request, "run.cancel", run)
        messages.success(request, f"Run #{run.pk} cancelled.")
    except RunNotCancellable as exc:
        messages.error(request, f"Not cancelled: {exc}.")
    return _redirect(request, reverse("tasks:run-detail", args=[run.pk]))


@require_POST
@role_required(OPERATOR)
def run_retry(request, pk: int):
    run = _get_run(pk)
    try:
        with transaction.atomic():
            retry = lifecycle.retry_run(run, user=request.user)
            audit.record(request, "run.retry", run, {"retry": retry.pk})
    except RunNotRetryable as exc:
        messages.error(request, f"Not retried: {exc}.")
        return _redirect(request, reverse("tasks:run-detail", args=[run.pk]))
    return _redirect(request, reverse("tasks:run-detail", args=[retry.pk]))


@require_POST
@role_required(ADMIN)
def scheduler_pause(request):
    with transaction.atomic():
        SchedulerState.set_paused(True, by=request.user.get_username())
        audit.record(request, "scheduler.pause", audit.SCHEDULER)
    # No flash: the banner on every page says it, with who and since when.
    return _redirect(request, _back(request))


@require_POST
@role_required(ADMIN)
def scheduler_resume(request):
    with transaction.atomic():
        SchedulerState.set_paused(False)
        audit.record(request, "scheduler.resume", audit.SCHEDULER)
    messages.success(request, "Scheduler resumed.")
    return _redirect(request, _back(request))


# The parts of the top of every page that follow the scheduler's state live.
SCHEDULER_PARTS = {"banner": "base.html#scheduler-banner", "switch": "base.html#scheduler-switch"}


@require_GET
@role_required(VIEWER)
def scheduler_state(request):
    """The pause banner (?part=banner, the default) or the admin's pause/resume
    switch (?part=switch), alone: what a page's live socket re-renders."""
    part = request.GET.get("part") or "banner"
    if part not in SCHEDULER_PARTS:
        return HttpResponseBadRequest(f"Unknown part {part[:40]!r}: one of banner, switch.")
    if part == "switch":
        roles.check(request.user, ADMIN)
    return render(request, SCHEDULER_PARTS[part])


def _back(request, default: str = "") -> str:
    """Where the form came from, if it is one of ours; else `default` (the task list)."""
    target = request.POST.get("next", "")
    # Django's own check, as its LoginView uses: a hand-rolled "starts with one
    # slash" let /\evil.example through, which browsers read as //evil.example.
    # A path of ours only: no scheme or host, even our own.
    if target.startswith("/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts=None, require_https=request.is_secure()
    ):
        return target
    return default or reverse("tasks:list")
