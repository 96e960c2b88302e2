"""Create the first admin account on first start, with a random password.

The password is printed once and kept in the data dir (mode 0600) so that
`make run` can show the login again; change it and delete the file.
"""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the 'admin' superuser with a random password if no user exists yet."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username: str, **options):
        users = get_user_model().objects
        password_file = settings.DATA_DIR / "admin-password.txt"
        if users.exists():
            if password_file.exists():
                self.stdout.write(f"login: {username} / {password_file.read_text().strip()}")
            else:
                self.stdout.write("login: an existing account (no generated password is on file)")
            return
        password = secrets.token_urlsafe(12)
        users.create_superuser(username=username, email="", password=password)
        password_file.touch(mode=0o600)
        password_file.write_text(password + "\n")
        self.stdout.write(f"created admin account; login: {username} / {password}")
