"""A real Chromium on the run page and the top bar: controls follow state,
output can be followed, pausing asks first, and every page fits a phone."""

from __future__ import annotations

import sys

import pytest

from tests.browser import DESKTOP, PHONE, chromium_page, log_in, page_overflow
from tests.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# 400 numbered lines, ten every 0.1 s: a box of output that grows for 4 s.
TICKER = (
    f"{sys.executable} -u -c "
    "\"import time\nfor i in range(400):\n print(f'line {i}')\n i % 10 == 9 and time.sleep(0.1)\""
)


def _run(master, **task) -> int:
    created = master.create_task(**task)
    return master.trigger(created["id"])["id"]


def test_the_run_pages_buttons_follow_the_run_without_a_reload(master, start_agent):
    start_agent("agent-1")
    with chromium_page(DESKTOP, "run-controls") as page:
        log_in(page, master)
        sleep = f'{sys.executable} -c "import time; time.sleep(4)"'
        run_id = _run(master, name="short", command=sleep)
        page.goto(f"{master.url}/runs/{run_id}/")
        page.evaluate("window.__no_reload = true")
        page.locator("#cancel-run").wait_for()

        page.locator("#run-status[data-status=succeeded]").wait_for(timeout=20_000)

        assert page.locator("#cancel-run").count() == 0
        assert page.locator("#retry-run").is_visible()
        assert page.evaluate("window.__no_reload") is True


def test_the_live_output_follows_its_end_and_keeps_a_readers_place(master, start_agent):
    start_agent("agent-1")
    with chromium_page(DESKTOP, "run-output") as page:
        log_in(page, master)
        run_id = _run(master, name="ticker", command=TICKER, shell=False)
        page.goto(f"{master.url}/runs/{run_id}/")
        box = page.locator("section.attempt pre.output-lines")

        def at_end_with_more_than(lines: int):
            state = box.evaluate(
                "b => [b.querySelectorAll('.line').length,"
                " b.scrollHeight - b.scrollTop - b.clientHeight, b.scrollHeight > b.clientHeight]"
            )
            return state if state[0] > lines and state[2] else None

        # Following: after refreshes with new lines, the newest line is in view.
        count, from_end, _ = wait_for(lambda: at_end_with_more_than(100), what="output to overflow")
        assert from_end <= 24
        count2, from_end2, _ = wait_for(
            lambda: at_end_with_more_than(count + 30), what="more lines"
        )
        assert from_end2 <= 24, "the box did not follow new output"

        # A reader who scrolls up stays there across the next refreshes.
        box.evaluate("b => { b.scrollTop = 40; }")
        wait_for(lambda: at_end_with_more_than(count2 + 30), what="more lines after scrolling up")
        assert box.evaluate("b => b.scrollTop") == 40

        page.locator("#run-status[data-status=succeeded]").wait_for(timeout=20_000)
        assert "line 399" in box.inner_text()


def test_pausing_asks_first_and_says_it_once(master):
    with chromium_page(DESKTOP, "pause") as page:
        log_in(page, master)
        dialogs = []

        page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.click("#pause-scheduler")
        page.wait_for_timeout(500)
        assert dialogs and dialogs[0].startswith("Pause the scheduler?")
        assert master.api("GET", "scheduler").json()["paused"] is False

        page.once("dialog", lambda d: d.accept())
        page.click("#pause-scheduler")
        page.locator("#paused-banner").wait_for()
        assert master.api("GET", "scheduler").json()["paused"] is True
        assert "paused" not in " ".join(page.locator(".messages li").all_inner_texts()).lower()
        assert page.locator("text=Scheduler paused").count() == 1

        page.click("#resume-scheduler")
        page.locator("#pause-scheduler").wait_for()
        assert master.api("GET", "scheduler").json()["paused"] is False


PAGES = [
    "/",
    "/tasks/",
    "/tasks/{task}/",
    "/tasks/new/",
    "/tasks/{task}/edit/",
    "/tasks/{task}/delete/",
    "/runs/",
    "/runs/{run}/",
    "/runs/{gone_run}/",
    "/workers/",
    "/api/docs",
]
LONG = "x" * 200  # the longest name a task may have, without a place to break


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["390px", "1280px"])
def test_every_page_fits_without_sideways_scrolling(master, start_agent, viewport):
    start_agent("agent-with-a-rather-long-name-1")
    task = master.create_task(name=LONG, command="echo " + "x" * 300, shell=True)
    run_id = master.trigger(task["id"])["id"]
    gone = master.create_task(name="y" * 200, command="true")
    gone_run = master.trigger(gone["id"])["id"]
    master.wait_final(run_id)
    master.wait_final(gone_run)
    assert master.api("DELETE", f"tasks/{gone['id']}").status_code == 204
    ids = {"task": task["id"], "run": run_id, "gone_run": gone_run}
    with chromium_page(viewport, f"fit-{viewport['width']}") as page:
        page.goto(f"{master.url}/login/")
        wide = {"/login/": page_overflow(page)} if page_overflow(page) > 0 else {}
        log_in(page, master)
        for path in PAGES:
            response = page.goto(master.url + path.format(**ids))
            assert response.status == 200, path
            page.wait_for_load_state("networkidle")
            if page_overflow(page) > 0:
                wide[path] = page_overflow(page)
            # The top bar spans the whole width; its links stay inside it.
            bar = page.locator(".topbar").bounding_box()
            assert bar["width"] >= viewport["width"] - 1, path
            for link in page.locator(".topbar nav a").all():
                box = link.bounding_box()
                assert box["y"] + box["height"] <= bar["y"] + bar["height"] + 1, path
        assert wide == {}, f"pages wider than the screen, by px: {wide}"


# The contrast of a text colour on a background (WCAG 2), from "rgb(r, g, b)" strings.
CONTRAST = """([fg, bg]) => {
  const lum = (css) => {
    const [r, g, b] = css.match(/[\\d.]+/g).slice(0, 3).map((v) => {
      v = Number(v) / 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}"""


def _colours(page, selector: str) -> tuple[str, str]:
    return page.locator(selector).first.evaluate(
        "e => { const s = getComputedStyle(e); return [s.color, s.backgroundColor]; }"
    )


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_pages_follow_the_systems_colour_scheme_and_stay_readable(master, start_agent, scheme):
    start_agent("agent-1")
    task = master.create_task(name="scheme", command="echo hi; exit 3", shell=True)
    run_id = master.trigger(task["id"])["id"]
    master.wait_final(run_id)
    with chromium_page(DESKTOP, f"scheme-{scheme}", color_scheme=scheme) as page:
        log_in(page, master)
        for path in ("/", f"/runs/{run_id}/", "/runs/", "/workers/"):
            page.goto(master.url + path)
            text, background = page.evaluate(
                "() => { const s = getComputedStyle(document.body);"
                " return [s.color, s.backgroundColor]; }"
            )
            # Dark text on a light page, or light text on a dark one, as the system says.
            dark_page = page.evaluate(CONTRAST, ["rgb(0, 0, 0)", background]) < 5
            assert dark_page == (scheme == "dark"), (path, background)
            assert page.evaluate(CONTRAST, [text, background]) >= 7, path
            cards = _colours(page, ".card, .table")
            assert page.evaluate(CONTRAST, [text, cards[1]]) >= 7, path
        page.goto(f"{master.url}/runs/{run_id}/")
        badge = _colours(page, "#run-status")
        assert page.evaluate(CONTRAST, badge) >= 3, badge
