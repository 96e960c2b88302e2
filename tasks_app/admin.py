from django import forms
from django.contrib import admin

from tasks_app import roles, routing
from tasks_app.models import (
    ApiToken,
    Attempt,
    AuditEntry,
    DeletedTask,
    Delivery,
    Event,
    LogChunk,
    NotifyCursor,
    Run,
    SchedulerState,
    Task,
)


class HistoryAdmin(admin.ModelAdmin):
    """History is what happened: admin shows it and never adds or edits it.

    Superusers may still delete rows (pruning old history); the dashboard and
    the API are how runs are created, cancelled and retried.
    """

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return roles.allows(request.user, roles.ADMIN)


class TriggerFilter(admin.SimpleListFilter):
    """The triggers a run can have today (schedules come with issue 8)."""

    title = "trigger"
    parameter_name = "trigger"
    OFFERED = (Run.Trigger.MANUAL, Run.Trigger.API, Run.Trigger.RETRY)

    def lookups(self, request, model_admin):
        return [(value, value.label) for value in self.OFFERED]

    def queryset(self, request, queryset):
        return queryset.filter(trigger=self.value()) if self.value() else queryset


class TaskAdminForm(forms.ModelForm):
    """The admin's task form keeps the rule that spans two fields (a pinned
    worker goes with strategy pinned, and names a worker); each field's own
    rules are the model's."""

    class Meta:
        model = Task
        fields = "__all__"  # the admin shows every field

    def clean(self):
        cleaned = super().clean()
        strategy, name = cleaned.get("strategy"), cleaned.get("pinned_worker")
        if strategy is not None and name is not None:
            shards = cleaned.get("shards")
            for field, error in routing.shape_errors(strategy, name.strip(), shards).items():
                self.add_error(field, error)
        return cleaned


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    form = TaskAdminForm
    list_display = ["name", "command", "shell", "timeout", "enabled", "updated_at"]
    list_filter = ["enabled", "shell"]
    search_fields = ["name", "command"]
    # secret_env is not editable (its values are write-only, through the
    # dashboard or the API): the admin shows the names alone.
    readonly_fields = ["secret_env_keys", "secrets_unreadable"]

    @admin.display(boolean=True, description="Secret values unreadable (another SECRET_KEY)")
    def secrets_unreadable(self, task):
        return task.secrets_unreadable()


class AttemptInline(admin.TabularInline):
    def has_add_permission(self, request, obj=None):
        return False

    model = Attempt
    extra = 0
    fields = [
        "shard_index",
        "try_number",
        "worker_name",
        "status",
        "exit_code",
        "reason",
        "started_at",
        "finished_at",
    ]
    readonly_fields = fields
    can_delete = False


@admin.register(Run)
class RunAdmin(HistoryAdmin):
    list_display = ["id", "task_name", "status", "trigger", "created_at", "finished_at"]
    list_filter = ["status", TriggerFilter]
    search_fields = ["task_name"]
    raw_id_fields = ["task", "created_by"]
    inlines = [AttemptInline]
    # Keyset-friendly: no COUNT(*) over millions of rows for the paginator.
    show_full_result_count = False


@admin.register(Attempt)
class AttemptAdmin(HistoryAdmin):
    list_display = [
        "id",
        "run",
        "shard_index",
        "try_number",
        "worker_name",
        "status",
        "exit_code",
        "reason",
    ]
    list_filter = ["status"]
    raw_id_fields = ["run", "worker"]
    show_full_result_count = False


@admin.register(LogChunk)
class LogChunkAdmin(HistoryAdmin):
    list_display = ["id", "attempt", "seq", "stream"]
    raw_id_fields = ["attempt"]
    show_full_result_count = False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "name", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["token_hash", "last_used_at"]


@admin.register(SchedulerState)
class SchedulerStateAdmin(admin.ModelAdmin):
    list_display = ["id", "paused", "paused_at", "paused_by"]

    # A singleton (SchedulerState.current() is row 1): a second row or none would be ignored.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(DeletedTask)
class DeletedTaskAdmin(HistoryAdmin):
    list_display = ["id", "name", "deleted_at"]
    search_fields = ["name"]


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read only, for everyone: entries are never added, edited or deleted by hand."""

    list_display = ["at", "actor", "action", "target", "address"]
    list_filter = ["action"]
    search_fields = ["actor", "target"]
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Event)
class EventAdmin(HistoryAdmin):
    """The outbox of state changes: shown, never added or edited by hand."""

    list_display = ["id", "at", "kind", "run_id", "attempt_id", "task_id", "worker_id"]
    list_filter = ["kind"]
    search_fields = ["=run_id", "=task_id", "=worker_id"]
    show_full_result_count = False


@admin.register(Delivery)
class DeliveryAdmin(HistoryAdmin):
    """Notifications sent or being sent (tasks_app.notify): shown, never edited."""

    list_display = [
        "id",
        "created_at",
        "kind",
        "channel",
        "target",
        "status",
        "attempts",
        "response_code",
        "sent_at",
    ]
    list_filter = ["status", "channel", "kind"]
    search_fields = ["=task_id", "=run_id", "target"]
    show_full_result_count = False


@admin.register(NotifyCursor)
class NotifyCursorAdmin(HistoryAdmin):
    """How far the notification planners have read the events."""

    list_display = ["last_event_id", "updated_at"]
