from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from tasks_app import audit
from tasks_app.models import ApiToken


class Command(BaseCommand):
    help = "Mint an API token for USERNAME and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="A note to recognise the token by.")
        parser.add_argument(
            "--expires-days",
            type=int,
            default=0,
            help="Days until the token stops working; 0 (default): until revoked.",
        )

    def handle(self, *args, username: str, name: str, expires_days: int, **options):
        if expires_days < 0:
            raise CommandError("--expires-days: give 0 (never) or a positive number of days")
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            hint = " (`make run` creates admin on its first start)" if username == "admin" else ""
            raise CommandError(f"no active user named {username!r}{hint}")
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        with transaction.atomic():
            raw, token = ApiToken.mint(user, name=name, expires_at=expires_at)
            audit.record_as("manage.py", "token.create", token, audit.token_changes(token))
        self.stdout.write(raw)
