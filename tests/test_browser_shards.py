"""A real Chromium on the run page of a run of 1,000 shards: every cell is
drawn, the page fits a phone, and a cell shows that shard alone."""

from __future__ import annotations

import pytest

from tests.browser import PHONE, chromium_page, log_in, page_overflow

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Made in the master's own database through the model and lifecycle (no
# agents): 1,000 shards, 600 of them done (none running: with no worker
# behind it, the master's liveness would declare a running attempt lost).
MAKE_RUN = """
from django.utils import timezone
from tasks_app import lifecycle
from tasks_app.models import Attempt, Task
task = Task.objects.create(name="thousand", command="true", shards=1000, merge_command="cat")
run = lifecycle.trigger_run(task)
now = timezone.now()
Attempt.objects.filter(run=run, shard_index__lt=600).update(
    status="succeeded", worker_name="node-with-a-long-name-7", started_at=now, finished_at=now
)
Attempt.objects.filter(run=run, shard_index=7).update(status="failed", reason="exit code 1")
Attempt.objects.create(run=run, shard_index=7, try_number=2, status="succeeded")
lifecycle.refresh_runs([run.pk])
print(run.pk)
"""


def test_a_run_of_1000_shards_draws_every_cell_and_fits_a_phone(master):
    run_id = int(master.manage("shell", "-c", MAKE_RUN).splitlines()[-1])
    with chromium_page(PHONE, "thousand-shards") as page:
        log_in(page, master, then=f"/runs/{run_id}/")
        page.locator("#shard-grid").wait_for()

        cells = page.locator("#shard-grid .cell")
        assert cells.count() == 1000
        assert page.locator("#shard-grid .cell[data-status=succeeded]").count() == 600
        assert page.locator("#shard-grid .cell[data-status=queued]").count() == 400
        assert page.inner_text("#shard-counts").split() == ["400", "queued", "600", "succeeded"]
        assert page.locator("pre.log").count() == 0  # no output box until one is chosen
        assert page_overflow(page) == 0
        # A shard retried once: its cell says so; choosing it shows its two tries.
        cell = page.locator("#shard-grid .cell[data-shard='7']")
        assert "2 attempts" in cell.get_attribute("title")
        cell.click()
        page.wait_for_url(f"**/runs/{run_id}/?shard=7")
        page.locator("#shard-selected").wait_for()
        assert page.locator("section.attempt").count() == 2
        assert page.locator("pre.log").count() == 2  # the output of each try
        assert page_overflow(page) == 0
