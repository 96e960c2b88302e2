"""Django admin for admins only (tasks_app.roles), whether or not they are staff."""

from django.contrib import admin

from tasks_app import roles


class SchedulerAdminSite(admin.AdminSite):
    site_header = "Scheduler administration"

    def has_permission(self, request) -> bool:
        # Viewers and operators are refused even with is_staff set; an admin
        # by group needs no is_staff. The models' own permissions still apply:
        # the admin group holds them all (roles.sync_groups).
        return roles.allows(request.user, roles.ADMIN)
