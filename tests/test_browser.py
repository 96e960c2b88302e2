"""A real Chromium drives the dashboard against a real server and agent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
        screenshots = os.environ.get("SCREENSHOT_DIR")
        if screenshots:
            page.screenshot(path=str(Path(screenshots) / "browser-last.png"), full_page=True)
        browser.close()


def _log_in(page, master) -> None:
    password = (master.data_dir / "admin-password.txt").read_text().strip()
    page.goto(f"{master.url}/tasks/")
    assert "/login/" in page.url
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"{master.url}/tasks/")


def test_a_user_fixes_an_inline_error_runs_the_task_and_reads_its_output(master, start_agent, page):
    start_agent("browser-agent")
    _log_in(page, master)

    page.click("text=New task")
    page.fill("input[name=name]", "answer")
    page.fill("input[name=command]", f'{sys.executable} -c "print(6*7)')  # unbalanced quote
    # A marker that a full page load would wipe: the error must arrive by an HTMX swap.
    page.evaluate("window.__no_reload = true")
    page.click("button:has-text('Create task')")

    error = page.locator(".field-error[data-field=command]")
    error.wait_for()
    assert error.inner_text() == "Cannot split the command into arguments: No closing quotation."
    assert page.evaluate("window.__no_reload") is True
    assert page.input_value("input[name=name]") == "answer"

    page.fill("input[name=command]", f'{sys.executable} -c "print(6*7)"')
    page.click("button:has-text('Create task')")
    page.wait_for_url(f"{master.url}/tasks/")
    row = page.locator("tr", has_text="answer")
    assert "print(6*7)" in row.inner_text()

    row.locator("button:has-text('Run now')").click()
    page.wait_for_url(f"{master.url}/runs/*/")
    # The page polls until the run is final; the output appears without a reload.
    page.locator("#run-status.succeeded").wait_for()
    assert page.locator("pre.stdout").inner_text() == "42\n"
    assert page.locator(".exit-code").inner_text() == "0"
    assert "browser-agent" in page.locator(".attempt").inner_text()
