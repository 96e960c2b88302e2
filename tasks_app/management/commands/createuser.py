"""`manage.py createuser NAME --role viewer|operator|admin` for scripts and provisioning.

The password comes from a file (never from the command line, where `ps` and
shell histories show it); without one the account has no usable password and
serves API tokens only (`manage.py apitoken NAME`).
"""

from pathlib import Path

from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks_app import audit, roles


class Command(BaseCommand):
    help = "Create a user with a role; --update changes an existing one's role (and password)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=roles.ROLES)
        parser.add_argument(
            "--password-file",
            type=Path,
            help="A file whose first line is the password; without it, API tokens only.",
        )
        parser.add_argument("--email", default="")
        parser.add_argument(
            "--update", action="store_true", help="Change the role of an existing user."
        )

    def handle(self, *args, username, role, password_file, email, update, **options):
        users = get_user_model()
        try:
            users._meta.get_field(users.USERNAME_FIELD).run_validators(username)
        except ValidationError as exc:
            raise CommandError(f"username {username!r}: {' '.join(exc.messages)}") from None
        password = _read_password(password_file) if password_file else None
        with transaction.atomic():
            user = users.objects.select_for_update().filter(username=username).first()
            if user is not None and not update:
                raise CommandError(f"user {username!r} exists; add --update to change its role")
            old_role = roles.role_of(user) if user is not None else None
            if user is None:
                user = users(username=username, email=email)
            action = "user.update" if user.pk else "user.create"
            if password is not None:
                try:
                    password_validation.validate_password(password, user)
                except ValidationError as exc:
                    raise CommandError(f"password: {' '.join(exc.messages)}") from None
                user.set_password(password)
            elif user.pk is None:
                user.set_unusable_password()
            user.save()
            roles.set_role(user, role)
            if user.is_superuser and role != roles.ADMIN:
                # A superuser is an admin whatever its groups: say so, do not pretend.
                raise CommandError(f"{username!r} is a superuser, which is always an admin")
            changes = {"role": [old_role, role]} if old_role != role else {}
            if password is not None:
                changes["password"] = "set"  # that it changed, never what to
            audit.record_as("manage.py", action, user, changes)
        self.stdout.write(f"{username}: {role}{'' if password else ' (API tokens only)'}")


def _read_password(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--password-file {path}: {exc}") from None
    if not lines or not lines[0]:
        raise CommandError(f"--password-file {path}: the first line is empty")
    return lines[0]
