"""Django admin for admins only (tasks_app.roles), whether or not they are staff.

Every change made in it goes into the audit log (tasks_app.audit): the site
mixes `AuditedAdmin` into each model's admin as it is registered, Django's own
User and Group admins and those added later included.
"""

from django.contrib import admin
from django.contrib.auth import get_user_model

from tasks_app import audit, roles


class AuditedAdmin:
    """Django admin's add, change and delete, recorded as `<kind>.create`,
    `.update` and `.delete` with the names of the fields changed (admin's own
    change message: no values, so no secret or password hash either)."""

    def log_addition(self, request, obj, message):
        audit.record(request, _action(obj, "create"), obj, _fields(message, "added"))
        return super().log_addition(request, obj, message)

    def log_change(self, request, obj, message):
        changes = _fields(message, "changed")
        if isinstance(obj, get_user_model()) and hasattr(request, "_audit_role_before"):
            before = request._audit_role_before
            after = roles.role_of(type(obj).objects.get(pk=obj.pk))
            if after != before:
                changes["role"] = [before, after]
        audit.record(request, _action(obj, "update"), obj, changes)
        return super().log_change(request, obj, message)

    def log_deletions(self, request, queryset):
        # One entry per object: each is its own target.
        for obj in queryset:
            audit.record(request, _action(obj, "delete"), obj)
        return super().log_deletions(request, queryset)

    def save_model(self, request, obj, form, change):
        # A user's role lives in its groups, saved after the user: note it
        # before, compare in log_change.
        if change and isinstance(obj, get_user_model()):
            old = type(obj).objects.get(pk=obj.pk)
            request._audit_role_before = roles.role_of(old)
        return super().save_model(request, obj, form, change)


def _action(obj, verb: str) -> str:
    return f"{audit.describe(obj)[0].replace(' ', '_')}.{verb}"


def _fields(message, key: str) -> dict:
    fields = [
        name
        for part in (message if isinstance(message, list) else [])
        for name in part.get(key, {}).get("fields", [])
    ]
    return {"fields": fields} if fields else {}


class SchedulerAdminSite(admin.AdminSite):
    site_header = "Scheduler administration"

    def has_permission(self, request) -> bool:
        # Viewers and operators are refused even with is_staff set; an admin
        # by group needs no is_staff. The models' own permissions still apply:
        # the admin group holds them all (roles.sync_groups).
        return roles.allows(request.user, roles.ADMIN)

    def register(self, model_or_iterable, admin_class=None, **options):
        base = admin_class or admin.ModelAdmin
        audited = type(f"Audited{base.__name__}", (AuditedAdmin, base), {})
        return super().register(model_or_iterable, audited, **options)
