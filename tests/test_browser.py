"""A real Chromium drives the dashboard against a real server and agent."""

from __future__ import annotations

import sys

import pytest

from tests.browser import chromium_page, log_in, task_page

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


@pytest.fixture
def page():
    with chromium_page() as page:
        yield page


def test_a_user_fixes_an_inline_error_runs_the_task_and_reads_its_output(master, start_agent, page):
    start_agent("browser-agent")
    log_in(page, master)

    page.click("text=New task")
    page.fill("input[name=name]", "answer")
    page.fill("textarea[name=command]", f'{sys.executable} -c "print(6*7)')  # unbalanced quote
    # A marker that a full page load would wipe: the error must arrive by an HTMX swap.
    page.evaluate("window.__no_reload = true")
    page.click("button:has-text('Create task')")

    error = page.locator(".field-error[data-field=command]")
    error.wait_for()
    assert error.inner_text() == "Cannot split the command into arguments: No closing quotation."
    assert page.evaluate("window.__no_reload") is True
    assert page.input_value("input[name=name]") == "answer"

    page.fill("textarea[name=command]", f'{sys.executable} -c "print(6*7)"')
    page.click("button:has-text('Create task')")
    page.wait_for_url(task_page(master))  # the new task's own page
    page.click("nav a:has-text('Tasks')")
    row = page.locator("tr", has_text="answer")
    assert "print(6*7)" in row.inner_text()

    row.locator("button:has-text('Run now')").click()
    page.wait_for_url(f"{master.url}/runs/*/")
    # The page follows the run live; the output appears without a reload.
    page.locator("#run-status.succeeded").wait_for()
    assert page.locator("section.attempt .line[data-stream=stdout]").all_inner_texts() == ["42"]
    assert page.locator(".exit-code").inner_text() == "0"
    assert "browser-agent" in page.locator(".attempt").inner_text()
