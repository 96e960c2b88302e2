"""Who may do what: three roles on Django's groups and permissions.

- viewer: reads tasks, runs, output and workers;
- operator: also creates, edits, deletes, runs, cancels, retries and drains;
- admin: also enrolls, approves and revokes workers, pauses the scheduler,
  manages users and uses Django admin.

Each role is a permission on Task (`tasks_app.view_scheduler`, ...), held
through the group of the same name (a migration and every `migrate` keep the
groups in step, see `sync_groups`). A user's role is the highest of those
permissions they hold, from any group or directly; superusers are admins. An
account without any of them (an "outsider") can log in and sees nothing.

Every dashboard view declares its role with `role_required`, every API
operation with `Operation(role=...)`; tests/test_roles.py walks the URL conf
and fails for a view that declares none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import wraps

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import Q

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)  # each includes the ones before it

# role -> the codename of the Task permission that grants it (Task.Meta.permissions).
PERMISSIONS = {
    VIEWER: "view_scheduler",
    OPERATOR: "operate_scheduler",
    ADMIN: "administer_scheduler",
}


def perm(role: str) -> str:
    return f"tasks_app.{PERMISSIONS[role]}"


def role_of(user) -> str | None:
    """The user's role, or None for an anonymous, inactive or role-less account.

    ModelBackend caches a user's permissions on the object: one query per
    request however often this is asked.
    """
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    if user.is_superuser:
        return ADMIN
    for role in reversed(ROLES):
        if user.has_perm(perm(role)):
            return role
    return None


def allows_role(role: str | None, needed: str) -> bool:
    """Whether `role` is `needed` or above."""
    return role is not None and ROLES.index(role) >= ROLES.index(needed)


def allows(user, needed: str) -> bool:
    """Whether the user's role is `needed` or above."""
    return allows_role(role_of(user), needed)


def refusal(needed: str) -> str:
    return f"this needs the {needed} role"


def check(user, needed: str) -> None:
    """PermissionDenied unless the user's role is `needed` or above (for a rule
    that depends on what is asked, beside the view's own role)."""
    if not allows(user, needed):
        raise PermissionDenied(refusal(needed))


def role_required(needed: str) -> Callable:
    """A dashboard view for `needed` and above: the login page for anonymous
    users, 403 for a logged-in user below that role."""
    if needed not in ROLES:
        raise ValueError(f"unknown role {needed!r}")

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                from django.contrib.auth.views import redirect_to_login

                return redirect_to_login(request.get_full_path())
            check(request.user, needed)
            return view(request, *args, **kwargs)

        wrapper.required_role = needed
        return wrapper

    return decorate


def users_with(needed: str, user_ids: Iterable[int]) -> set[int]:
    """Those of these (active) users whose role is `needed` or above, in one query."""
    user_ids = set(user_ids)
    if not user_ids:
        return set()
    codenames = [PERMISSIONS[role] for role in ROLES[ROLES.index(needed) :]]
    holds = (
        Q(is_superuser=True)
        | Q(
            groups__permissions__codename__in=codenames,
            groups__permissions__content_type__app_label="tasks_app",
        )
        | Q(
            user_permissions__codename__in=codenames,
            user_permissions__content_type__app_label="tasks_app",
        )
    )
    users = get_user_model().objects.filter(holds, pk__in=user_ids, is_active=True)
    return set(users.values_list("pk", flat=True).distinct())


def set_role(user, role: str | None) -> None:
    """Make the user a member of exactly this role's group (None: of none)."""
    from django.contrib.auth.models import Group

    groups = Group.objects.filter(name__in=ROLES)
    user.groups.remove(*groups)
    if role is not None:
        user.groups.add(Group.objects.get(name=role))


def sync_groups(apps, using: str = "default") -> None:
    """Create the three groups with their permissions; the admin group also gets
    every model permission, so that Django admin works for every model,
    including those added later (this runs after every migrate)."""
    from django.contrib.auth.management import create_permissions

    for config in apps.get_app_configs():
        # A migration's historical app configs have no models_module, which
        # create_permissions takes for "no models".
        stub = getattr(config, "models_module", None) is None
        if stub:
            config.models_module = True
        create_permissions(config, verbosity=0, using=using, apps=apps)
        if stub:
            config.models_module = None
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    codenames = []
    for role in ROLES:
        codenames.append(PERMISSIONS[role])
        group, _ = group_model.objects.using(using).get_or_create(name=role)
        granted = permission_model.objects.using(using).filter(
            content_type__app_label="tasks_app", codename__in=codenames
        )
        if role == ADMIN:
            granted = permission_model.objects.using(using).all()
        group.permissions.add(*granted)
