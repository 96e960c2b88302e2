from django.contrib import admin

from workers_app.models import EnrollmentToken, Worker


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "hostname",
        "state",
        "capacity",
        "last_heartbeat",
        "agent_version",
        "revoked_at",
    ]
    list_filter = ["state"]
    search_fields = ["name", "hostname"]
    readonly_fields = ["credential_hash", "channel_name", "last_heartbeat", "connected_at"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    list_display = ["id", "note", "created_by", "created_at", "expires_at", "revoked_at", "uses"]
    readonly_fields = ["token_hash", "uses"]
