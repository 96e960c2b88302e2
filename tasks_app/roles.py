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

import functools
from collections.abc import Callable, Iterable

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import connection

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
        @functools.wraps(view)
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
    """Those of these (active) users whose role is `needed` or above, in one query.

    The writer asks this once per batch of API triggers, so the statement is
    composed once per role (the ORM spent more time building its join of seven
    tables than the database spent answering it).
    """
    user_ids = sorted(set(user_ids))
    if not user_ids:
        return set()
    codenames = [PERMISSIONS[role] for role in ROLES[ROLES.index(needed) :]]
    sql = _holders_sql(len(codenames)).replace(IDS, ", ".join(["%s"] * len(user_ids)))
    params = [True, True, "tasks_app", *codenames, "tasks_app", *codenames, *user_ids]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


IDS = "<user ids>"


@functools.cache
def _holders_sql(codenames: int) -> str:
    """Active users (their ids left as IDS) who are superusers or hold one of
    `codenames` Task permissions, through a group or directly."""
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    quote = connection.ops.quote_name
    user = get_user_model()
    via_group = user._meta.get_field("groups").remote_field.through._meta
    group_perm = Group._meta.get_field("permissions").remote_field.through._meta
    user_perm = user._meta.get_field("user_permissions").remote_field.through._meta

    def column(meta, name: str) -> str:
        return quote(meta.get_field(name).column)

    perm, ctype = Permission._meta, ContentType._meta
    held = (
        f"JOIN {quote(perm.db_table)} p ON p.{column(perm, 'id')} = {{link}}"
        f" JOIN {quote(ctype.db_table)} ct ON ct.{column(ctype, 'id')}"
        f" = p.{column(perm, 'content_type')}"
        f" WHERE {{owner}} = u.{column(user._meta, 'id')}"
        f" AND ct.{column(ctype, 'app_label')} = %s"
        f" AND p.{column(perm, 'codename')} IN ({', '.join(['%s'] * codenames)})"
    )
    through_group = (
        f"SELECT 1 FROM {quote(via_group.db_table)} ug"
        f" JOIN {quote(group_perm.db_table)} gp"
        f" ON gp.{column(group_perm, 'group')} = ug.{column(via_group, 'group')} "
        + held.format(
            link=f"gp.{column(group_perm, 'permission')}",
            owner=f"ug.{column(via_group, 'user')}",
        )
    )
    directly = f"SELECT 1 FROM {quote(user_perm.db_table)} up " + held.format(
        link=f"up.{column(user_perm, 'permission')}", owner=f"up.{column(user_perm, 'user')}"
    )
    return (
        f"SELECT u.{column(user._meta, 'id')} FROM {quote(user._meta.db_table)} u"
        f" WHERE u.{column(user._meta, 'is_active')} = %s"
        f" AND (u.{column(user._meta, 'is_superuser')} = %s"
        f" OR EXISTS ({through_group}) OR EXISTS ({directly}))"
        f" AND u.{column(user._meta, 'id')} IN ({IDS})"
    )


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
