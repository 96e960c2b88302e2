from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tasks_app import tokens
from tasks_app.models import ApiToken


class Command(BaseCommand):
    help = "Mint an API token for USERNAME and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="A note to recognise the token by.")

    def handle(self, *args, username: str, name: str, **options):
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            hint = " (`make run` creates admin on its first start)" if username == "admin" else ""
            raise CommandError(f"no active user named {username!r}{hint}")
        raw, digest = tokens.mint("api")
        ApiToken.objects.create(user=user, name=name[:100], token_hash=digest)
        self.stdout.write(raw)
