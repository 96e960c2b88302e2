from django.contrib import admin

from tasks_app.models import ApiToken, Attempt, LogChunk, Run, SchedulerState, Task


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["name", "command", "shell", "timeout", "enabled", "updated_at"]
    list_filter = ["enabled", "shell"]
    search_fields = ["name", "command"]


class AttemptInline(admin.TabularInline):
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
class RunAdmin(admin.ModelAdmin):
    list_display = ["id", "task_name", "status", "trigger", "created_at", "finished_at"]
    list_filter = ["status", "trigger"]
    search_fields = ["task_name"]
    raw_id_fields = ["task", "created_by"]
    inlines = [AttemptInline]
    # Keyset-friendly: no COUNT(*) over millions of rows for the paginator.
    show_full_result_count = False


@admin.register(Attempt)
class AttemptAdmin(admin.ModelAdmin):
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
class LogChunkAdmin(admin.ModelAdmin):
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
