"""A real Chromium on the runs list: a search swaps the table and keeps its
query in the address, and an operator selects a page of runs with the header's
box, keeps the selection while the table is swapped in again, and cancels them
in bulk."""

from __future__ import annotations

import pytest

from tests.browser import DESKTOP, chromium_page, log_in

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

BOXES = "#run-table input[name=ids]"


def test_select_all_survives_a_swap_and_bulk_cancel_cancels_the_selection(master):
    task = master.create_task(name="waits", command="true")
    other = master.create_task(name="other", command="true")
    # No agent: the runs stay queued, so they can be cancelled.
    mine = sorted(master.trigger(task["id"])["id"] for _ in range(3))
    theirs = master.trigger(other["id"])["id"]
    with chromium_page(DESKTOP) as page:
        log_in(page, master, then="/runs/")
        page.fill("input[name=name]", "wai")
        page.press("input[name=name]", "Enter")
        page.wait_for_function(f"document.querySelectorAll('{BOXES}').length === 3")
        assert "name=wai" in page.url

        page.check("input[data-select-all]")
        assert (
            sorted(
                int(v)
                for v in page.eval_on_selector_all(
                    f"{BOXES}:checked", "boxes => boxes.map(b => b.value)"
                )
            )
            == mine
        )
        assert page.inner_text("[data-selected-count]") == "3 selected:"
        # The table swapped in again, as a refresh does: the checks stay.
        page.evaluate(
            "document.querySelector('#run-table').__seen = true;"
            " htmx.ajax('GET', location.href, {target: '#run-table', swap: 'outerHTML'})"
        )
        page.wait_for_function("!document.querySelector('#run-table').__seen")
        page.wait_for_function(
            f"document.querySelectorAll('{BOXES}:checked').length === 3", timeout=5_000
        )
        assert page.is_checked("input[data-select-all]")

        page.click("button:has-text('Cancel selected')")
        page.locator(".messages").wait_for()
        assert "Cancelled 3 runs." in page.inner_text(".messages")
        assert "name=wai" in page.url

    assert [master.run_of(pk)["status"] for pk in mine] == ["cancelled"] * 3
    assert master.run_of(theirs)["status"] == "queued"
