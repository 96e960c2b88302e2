"""Chromium for the browser tests: one launch per test, at a desktop or phone size."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@contextmanager
def chromium_page(
    viewport: dict = DESKTOP,
    name: str = "browser-last",
    timezone_id: str | None = None,
    color_scheme: str = "light",
):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            options = {"timezone_id": timezone_id} if timezone_id else {}
            context = browser.new_context(viewport=viewport, color_scheme=color_scheme, **options)
            page = context.new_page()
            page.set_default_timeout(15_000)
            try:
                yield page
            finally:
                # Also when the test failed: the picture is what went wrong.
                screenshots = os.environ.get("SCREENSHOT_DIR")
                if screenshots:
                    page.screenshot(path=str(Path(screenshots) / f"{name}.png"), full_page=True)
        finally:
            browser.close()


def log_in(page, master, then: str = "/tasks/") -> None:
    password = (master.data_dir / "admin-password.txt").read_text().strip()
    page.goto(f"{master.url}{then}")
    assert "/login/" in page.url
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"{master.url}{then}")


def page_overflow(page) -> int:
    """How many pixels the page is wider than the viewport (0 when it fits)."""
    return page.evaluate(
        "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
        " - window.innerWidth"
    )


def task_page(master) -> re.Pattern:
    """The URL of a task's own page. Not the glob /tasks/*/: it matches the
    form at /tasks/new/ as well, so a wait for it returned before the save
    redirected, and the test's next click was lost to that redirect."""
    return re.compile(re.escape(master.url) + r"/tasks/\d+/")
