"""`manage.py embed-wire`: copy scheduler_site/wire.py into the standalone agent.

The agent must stay one standard-library file, so it carries the protocol's
vocabulary as a verbatim copy; this command writes it (`make wire`), and
tests/test_protocol.py fails while the copy differs from the original.
"""

from django.core.management.base import BaseCommand

from workers_app import wirecopy


class Command(BaseCommand):
    help = "Copy scheduler_site/wire.py into workers_app/agent.py between its wire markers."

    def handle(self, *args, **options):
        changed = wirecopy.embed()
        self.stdout.write("agent.py updated" if changed else "agent.py already up to date")
