"""A real Chromium on live pages, a real server and a real agent: runs appear on
an open runs list, output lines on an open run page, both within a second and
with no HTTP request after the page loaded (the socket is the only traffic);
a page whose socket is cut says so and catches up once it reconnects."""

from __future__ import annotations

import time

import pytest

from tests.browser import DESKTOP, chromium_page, log_in
from tests.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SLOW_LINES = "for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done"


def _live(page) -> None:
    """Wait for the page's socket to be open and its watch to be sent."""
    page.wait_for_function("window.__liveSocket && window.__liveSocket.readyState === 1")
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(200)


def _count_requests(page) -> list[str]:
    """HTTP requests the page makes from now on (its socket is not one)."""
    made: list[str] = []
    page.on("request", lambda request: made.append(f"{request.method} {request.url}"))
    return made


def test_a_run_started_from_the_api_appears_on_an_open_runs_list_without_polling(
    master, start_agent
):
    start_agent("agent-1")
    task = master.create_task(name="quick", command="echo hi", shell=True)
    with chromium_page(DESKTOP, "live-runs") as page:
        log_in(page, master, then="/runs/")
        _live(page)
        made = _count_requests(page)

        started = time.monotonic()
        run_id = master.trigger(task["id"])["id"]
        row = page.locator(f'#run-table a[href="/runs/{run_id}/"]')
        row.wait_for(timeout=1_000)
        appeared = time.monotonic() - started
        # ...and follows the run to its end, still without a request.
        page.locator(f'#run-table tr:has(a[href="/runs/{run_id}/"]) .badge.succeeded').wait_for(
            timeout=10_000
        )
        page.wait_for_timeout(1_000)  # a polling page would have asked again by now

        assert appeared < 1.0
        assert made == [], f"the page made HTTP requests after it loaded: {made}"
        assert page.evaluate("window.__liveSocket.readyState") == 1


def test_an_open_run_page_shows_each_output_line_as_it_arrives(master, start_agent):
    task = master.create_task(name="slow-lines", command=SLOW_LINES, shell=True)
    run_id = master.trigger(task["id"])["id"]
    with chromium_page(DESKTOP, "live-output") as page:
        log_in(page, master, then=f"/runs/{run_id}/")
        _live(page)
        made = _count_requests(page)
        box = page.locator("section.attempt pre.output-lines")
        # Empty (the viewer's CSS says so): the run is queued, nothing printed yet.
        assert box.locator("span.line").count() == 0
        lines_of = "b => Array.from(b.querySelectorAll('.line'), l => l.textContent).join('\\n')"

        start_agent("agent-1")  # queued until now: the page was open before the first line
        seen: list[tuple[float, str]] = []

        def finished():
            text = box.evaluate(lines_of)
            if not seen or seen[-1][1] != text:
                seen.append((time.monotonic(), text))
            return text if "line 5" in text else None

        wait_for(finished, timeout=20, interval=0.02, what="all five lines")
        page.locator("#run-status[data-status=succeeded]").wait_for(timeout=10_000)

        shown = [text for _, text in seen]
        expected = ["\n".join(f"line {n}" for n in range(1, k + 1)) for k in range(1, 6)]
        # One line at a time, in order, each shown before the next was printed.
        assert [t for t in shown if t in expected] == expected, shown
        assert box.evaluate(lines_of) == expected[-1]
        # Numbered as the page itself numbers them.
        numbers = box.evaluate("b => Array.from(b.querySelectorAll('.line'), l => l.dataset.n)")
        assert numbers == ["1", "2", "3", "4", "5"]
        assert box.locator("span.line[data-stream=stdout]").count() == 5
        assert made == [], f"the page made HTTP requests after it loaded: {made}"


def test_a_page_whose_socket_is_cut_says_so_and_catches_up_after_reconnecting(master, start_agent):
    start_agent("agent-1")
    task = master.create_task(name="meanwhile", command="echo done-meanwhile", shell=True)
    with chromium_page(DESKTOP, "live-reconnect") as page:
        cut = {"on": False}

        def route(ws):
            # While cut, every (re)connection is closed at once; else it goes
            # through to the real server.
            if cut["on"]:
                ws.close()
            else:
                ws.connect_to_server()

        page.route_web_socket("**/ws/live/", route)
        log_in(page, master, then="/runs/")
        _live(page)
        bar = page.locator("#live-disconnected")
        assert bar.count() == 0

        cut["on"] = True
        page.evaluate("window.__liveSocket.close()")
        bar.wait_for()
        assert bar.inner_text() == "Live updates disconnected — reconnecting…"

        run_id = master.trigger(task["id"])["id"]
        master.wait_final(run_id)
        page.wait_for_timeout(700)  # reconnections were refused meanwhile
        assert page.locator(f'a[href="/runs/{run_id}/"]').count() == 0
        assert bar.is_visible()

        cut["on"] = False
        # The next try (backoff at most 5 s) gets through and catches up.
        page.locator(f'#run-table tr:has(a[href="/runs/{run_id}/"]) .badge.succeeded').wait_for(
            timeout=8_000
        )
        bar.wait_for(state="detached")
