from django.contrib import admin

from workers_app.models import EnrollmentToken, Server, StuckQueue, Worker


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
    # State and approval move through the dashboard and the API (approve, drain,
    # disable, revoke), which keep dispatch and the audit log in step.
    readonly_fields = [
        "state",
        "approved_at",
        "approved_by",
        "reenroll_allowed",
        "requested_labels",
        "requested_capacity",
        "credential_hash",
        "channel_name",
        "server",
        "last_heartbeat",
        "connected_at",
    ]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    list_display = ["id", "note", "created_by", "created_at", "expires_at", "revoked_at", "uses"]
    readonly_fields = ["token_hash", "uses"]


@admin.register(Server)
class ServerAdmin(admin.ModelAdmin):
    """Live server processes: written by the servers themselves, read-only here
    (deleting a dead one's row is allowed; a live one writes it back)."""

    list_display = ["name", "address", "database", "channel_layer", "started_at", "last_seen"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(StuckQueue)
class StuckQueueAdmin(admin.ModelAdmin):
    """Label sets whose queued work no worker can take (workers_app.stuck); kept by
    the servers, shown here."""

    list_display = ["labels_key", "since", "alerted_at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
