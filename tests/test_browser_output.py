"""A real Chromium on the output viewer: coloured numbered lines whose numbers
are not copied, search with "n of m" and Enter / Shift+Enter, the stdout /
stderr switch, and the raw download through the real server."""

from __future__ import annotations

import sys

import pytest

from tests.browser import DESKTOP, chromium_page, log_in
from tests.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# 60 green lines on stdout, an ERROR line on stderr every 10th, and a last
# "Error:" line on stdout: 7 matches of "error", 6 of them on stderr.
PRINTER = (
    f'{sys.executable} -u -c "import sys\nfor i in range(60):\n'
    " print(f'\\x1b[32mok {i}\\x1b[0m')\n"
    " i % 10 == 0 and print(f'ERROR number {i}', file=sys.stderr)\n"
    "print('Error: the end <b>')\""
)


def test_the_output_viewer_searches_filters_and_downloads(master, start_agent):
    start_agent("agent-1")
    task = master.create_task(name="printer", command=PRINTER, shell=False)
    run_id = master.trigger(task["id"])["id"]
    master.wait_final(run_id)
    with chromium_page(DESKTOP, "output-viewer") as page:
        log_in(page, master, then=f"/runs/{run_id}/")
        viewer = page.locator("section.attempt .output")
        box = viewer.locator("pre.output-lines")
        lines = box.locator(".line")
        count = viewer.locator(".output-count")
        assert lines.count() == 67

        # Colours rendered, numbers drawn beside the lines, no escape code anywhere.
        first = box.locator(".line[data-stream=stdout]").first
        assert first.inner_text() == "ok 0"
        assert first.evaluate("l => getComputedStyle(l, '::before').content") == '"1"'
        green = first.locator("span.ansi-fg-2")
        assert green.evaluate("s => getComputedStyle(s).color") == "rgb(156, 204, 101)"
        assert "\x1b" not in box.evaluate("b => b.textContent")
        assert "Error: the end <b>" in box.inner_text()
        # Selecting the output copies its text without the line numbers.
        copied = box.evaluate(
            "b => { const r = document.createRange(); r.selectNodeContents(b);"
            " const s = getSelection(); s.removeAllRanges(); s.addRange(r);"
            " return s.toString(); }"
        )
        assert [text for text in copied.split("\n") if text] == lines.all_inner_texts()
        assert lines.all_inner_texts()[0] in ("ok 0", "ERROR number 0")

        # Search: every match marked, case-insensitive, "n of m", Enter / Shift+Enter.
        search = viewer.locator(".output-search")
        search.fill("error")
        page.wait_for_function(
            "c => c.textContent === '1 of 7'", arg=count.element_handle(), timeout=5_000
        )
        assert box.locator("mark.hit").count() == 7
        assert box.locator("mark.hit.current").inner_text() in ("ERROR", "Error")
        search.press("Enter")
        assert count.inner_text() == "2 of 7"
        search.press("Shift+Enter")
        search.press("Shift+Enter")
        assert count.inner_text() == "7 of 7"
        assert lines.count() == 67  # searching hides nothing

        # The stream switch hides the other stream's lines and searches what is shown.
        viewer.locator("button[data-show=stderr]").click()
        assert count.inner_text() == "1 of 6"
        assert not box.locator(".line[data-stream=stdout]").first.is_visible()
        assert box.locator(".line[data-stream=stderr]").first.is_visible()
        assert viewer.locator("button[data-show=stderr]").get_attribute("aria-pressed") == "true"
        viewer.locator("button[data-show=stdout]").click()
        assert count.inner_text() == "1 of 1"
        assert not box.locator(".line[data-stream=stderr]").first.is_visible()
        viewer.locator("button[data-show=all]").click()
        assert count.inner_text() == "1 of 7"
        assert lines.count() == 67
        search.fill("no such text")
        page.wait_for_function(
            "c => c.textContent === 'No matches'", arg=count.element_handle(), timeout=5_000
        )
        assert box.locator("mark.hit").count() == 0
        assert first.inner_text() == "ok 0"  # the marks left the text as it was

        # The raw file, through the real server's streamed answer, codes kept.
        link = viewer.locator("a.output-download")
        answer = page.request.get(master.url + link.get_attribute("href"))
        assert answer.status == 200
        assert answer.headers["content-disposition"].startswith("attachment; filename=")
        body = answer.body()
        assert b"\x1b[32mok 0\x1b[0m\n" in body and b"\x1b[32mok 59\x1b[0m\n" in body
        assert body.count(b"ERROR number") == 6 and b"Error: the end <b>\n" in body


# 400 numbered lines, ten every 0.2 s; every 50th also on stderr.
TICKER = (
    f'{sys.executable} -u -c "import sys, time\nfor i in range(400):\n'
    " print(f'line {i}')\n"
    " i % 50 == 0 and print(f'warn {i}', file=sys.stderr)\n i % 10 == 9 and time.sleep(0.2)\""
)


def test_a_search_and_the_stream_choice_stay_while_output_grows(master, start_agent):
    start_agent("agent-1")
    task = master.create_task(name="ticker", command=TICKER, shell=False)
    with chromium_page(DESKTOP, "output-viewer-live") as page:
        log_in(page, master)
        run_id = master.trigger(task["id"])["id"]
        page.goto(f"{master.url}/runs/{run_id}/")
        viewer = page.locator("section.attempt .output")
        count = viewer.locator(".output-count")
        viewer.locator("button[data-show=stdout]").click()
        viewer.locator(".output-search").fill("LINE 1")

        def total() -> int:
            text = count.inner_text()
            return int(text.split(" of ")[1]) if " of " in text else 0

        first = wait_for(total, what="a first count of matches")
        page.locator("#run-status[data-status=succeeded]").wait_for(timeout=20_000)
        # "line 1", "line 10".."line 19", "line 100".."line 199": all found, as they came.
        wait_for(lambda: total() == 111, what="every match, once the run ended")
        assert first < 111
        assert viewer.locator(".output-search").input_value() == "LINE 1"
        assert viewer.locator("button[data-show=stdout]").get_attribute("aria-pressed") == "true"
        assert not viewer.locator(".line[data-stream=stderr]").first.is_visible()
        assert viewer.locator("mark.hit").count() == 111
