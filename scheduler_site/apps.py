from django.contrib.admin.apps import AdminConfig


class SchedulerAdminConfig(AdminConfig):
    """Django admin with our site (scheduler_site.adminsite): admins only."""

    default_site = "scheduler_site.adminsite.SchedulerAdminSite"
