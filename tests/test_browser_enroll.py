"""A real Chromium clicks *Add worker* and *Copy*: what lands in the clipboard is the command."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests import browser
from tests.browser import DESKTOP, PHONE, chromium_page, log_in
from workers_app import enrollment

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# A name that is not localhost, so Chromium treats the master as what it is on
# a LAN: plain http, not a secure context, no navigator.clipboard.
LAN_HOST = "scheduler.test"


def _add_worker(page, name: str = "") -> tuple[str, str]:
    page.fill("#add-worker-name", name)
    page.click("button:has-text('Add worker')")
    command = page.locator("#enroll-command")
    command.wait_for()
    return command.inner_text(), page.locator("#enroll-token").inner_text()


def _rendered_lines(page, selector: str) -> int:
    """How many lines the browser laid the element's text out on (wrapped ones count)."""
    return page.evaluate(
        """selector => {
            const range = document.createRange();
            range.selectNodeContents(document.querySelector(selector));
            return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
        }""",
        selector,
    )


def _sticking_out(page, selector: str) -> list[str]:
    """Elements whose right edge is past the viewport (the page scrolls sideways)."""
    return page.evaluate(
        """selector => [...document.querySelectorAll(selector)]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth)
            .map(e => e.tagName + '#' + e.id)""",
        selector,
    )


def test_copy_puts_the_exact_command_in_the_clipboard(master):
    with chromium_page(DESKTOP, name="enroll-desktop") as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=master.url)
        log_in(page, master, then="/workers/")
        shown, token = _add_worker(page, name="edge-9")

        page.click("button:has-text('Copy')")

        page.locator("button[data-copied=yes]:has-text('Copied')").wait_for()
        assert page.evaluate("window.isSecureContext") is True
        clipboard = page.evaluate("navigator.clipboard.readText()")
        assert clipboard == shown == enrollment.agent_command(master.url, token, name="edge-9")


@pytest.mark.master_env(SCHEDULER_ALLOWED_HOSTS=f"127.0.0.1,{LAN_HOST}")
def test_on_plain_http_copy_selects_the_command_and_it_never_wraps_on_a_phone(master, monkeypatch):
    monkeypatch.setattr(
        browser,
        "CHROMIUM_ARGS",
        [*browser.CHROMIUM_ARGS, f"--host-resolver-rules=MAP {LAN_HOST} 127.0.0.1"],
    )
    lan = SimpleNamespace(url=f"http://{LAN_HOST}:{master.port}", data_dir=master.data_dir)
    with chromium_page(PHONE, name="enroll-phone") as page:
        log_in(page, lan, then="/workers/")
        assert page.evaluate("[window.isSecureContext, 'clipboard' in navigator]") == [False, False]
        shown, token = _add_worker(page)

        page.click("button:has-text('Copy')")

        page.locator("button[data-copied]").wait_for()
        selected = page.evaluate("window.getSelection().toString()")
        assert selected == shown == enrollment.agent_command(lan.url, token)
        # execCommand("copy") really reached the clipboard: read it from a secure page.
        reader = page.context.new_page()
        page.context.grant_permissions(["clipboard-read"], origin=master.url)
        reader.goto(f"{master.url}/login/")
        assert reader.evaluate("navigator.clipboard.readText()") == shown

        # One shell line per rendered line: nothing wraps mid-word; the box
        # scrolls sideways and nothing of ours sticks out of the phone's screen.
        assert _rendered_lines(page, "#enroll-command") == shown.count("\n") + 1
        assert page.evaluate(
            "(e => e.scrollWidth > e.clientWidth)(document.querySelector('#enroll-command'))"
        )
        assert _sticking_out(page, "form.add-worker, form.add-worker *, #enrollment *") == []
