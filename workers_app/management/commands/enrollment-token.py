from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workers_app.models import EnrollmentToken


class Command(BaseCommand):
    help = "Mint an enrollment token for agents and print it (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--ttl-hours",
            type=float,
            default=settings.SCHEDULER_ENROLLMENT_TTL_HOURS,
            help="How long the token can enroll agents (default: SCHEDULER_ENROLLMENT_TTL_HOURS).",
        )
        parser.add_argument("--note", default="manage.py enrollment-token")

    def handle(self, *args, ttl_hours: float, note: str, **options):
        if ttl_hours <= 0:
            raise CommandError("--ttl-hours must be positive")
        raw, _ = EnrollmentToken.mint(note=note[:200], ttl_hours=ttl_hours)
        self.stdout.write(raw)
