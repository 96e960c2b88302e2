from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks_app import audit
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
        uses = parser.add_mutually_exclusive_group()
        uses.add_argument(
            "--max-uses",
            type=int,
            default=None,
            metavar="N",
            help="How many agents it may enroll (default: any number until it expires).",
        )
        uses.add_argument(
            "--single-use",
            action="store_const",
            const=1,
            dest="max_uses",
            help="It enrolls one agent (--max-uses 1).",
        )
        parser.add_argument(
            "--auto-approve",
            action="store_true",
            help="Workers it enrolls take work at once, with the labels and capacity their"
            " agents ask for, instead of waiting for an admin's approval.",
        )

    def handle(
        self,
        *args,
        ttl_hours: float,
        note: str,
        max_uses: int | None,
        auto_approve: bool,
        **options,
    ):
        if ttl_hours <= 0:
            raise CommandError("--ttl-hours must be positive")
        if max_uses is not None and max_uses < 1:
            raise CommandError("--max-uses must be at least 1")
        with transaction.atomic():
            raw, token = EnrollmentToken.mint(
                note=note[:200], ttl_hours=ttl_hours, max_uses=max_uses, auto_approve=auto_approve
            )
            audit.record_as("manage.py", "enrollment_token.create", token, token.options())
        self.stdout.write(raw)
