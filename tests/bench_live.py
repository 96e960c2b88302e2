"""What open live pages cost the server: `.venv/bin/python tests/bench_live.py [--pages N]`.

A real server (`manage.py serve`, the embedded engines), a logged-in admin,
and --pages real websockets each watching the runs list (as an open Runs tab
does). Runs are triggered through the API one after another, --runs of them,
first with no page open, then with the pages open: the server's CPU per
trigger in each case, the renders each page got (coalesced: at most one per
200 ms), and the time from a trigger's answer to the first page's new HTML
at idle. Prints one JSON object; asserts nothing on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect  # noqa: E402

from tests.bench import proc_cpu_s  # noqa: E402
from tests.harness import Master  # noqa: E402

REGION = {"id": "run-table", "src": "/runs/", "on": "runs attempts"}


def trigger_many(master: Master, task_id: int, count: int) -> float:
    """Server CPU seconds per trigger over `count` triggers."""
    before = proc_cpu_s(master.proc.pid)
    for _ in range(count):
        master.trigger(task_id)
    time.sleep(0.5)  # the last renders
    return (proc_cpu_s(master.proc.pid) - before) / count


async def open_pages(master: Master, cookie: str, count: int) -> list:
    ws_url = master.url.replace("http", "ws") + "/ws/live/"
    headers = {"Cookie": cookie, "Origin": master.url}
    pages = []
    for _ in range(count):
        page = await connect(ws_url, additional_headers=headers, max_size=None)
        watch = {"type": "watch", "regions": [REGION], "page": master.url + "/runs/"}
        await page.send(json.dumps({**watch, "run": None, "output": {}, "since": None}))
        pages.append(page)
    return pages


async def drain(page, counts: dict) -> None:
    async for text in page:
        if json.loads(text)["type"] == "html":
            counts[id(page)] = counts.get(id(page), 0) + 1


async def main(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        master = Master.launch(Path(tmp) / "master")
        try:
            session = master.logged_in()
            cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
            task = master.create_task(name="bench-live", command="true")
            master.trigger(task["id"])  # warm up
            alone = trigger_many(master, task["id"], args.runs)

            pages = await open_pages(master, cookie, args.pages)
            counts: dict = {}
            readers = [asyncio.create_task(drain(p, counts)) for p in pages]
            await asyncio.sleep(0.5)
            watched = await asyncio.to_thread(trigger_many, master, task["id"], args.runs)
            renders = sorted(counts.get(id(p), 0) for p in pages)

            for reader in readers:
                reader.cancel()
            first = pages[0]
            latencies = []
            for _ in range(args.latency):
                await asyncio.sleep(0.4)  # idle: past the coalescing window
                started = time.perf_counter()
                run_id = master.trigger(task["id"])["id"]
                while f'href="/runs/{run_id}/"' not in json.loads(await first.recv()).get(
                    "html", ""
                ):
                    pass
                latencies.append((time.perf_counter() - started) * 1000)
            for page in pages:
                await page.close()
        finally:
            master.release()
    return {
        "pages": args.pages,
        "runs": args.runs,
        "server_cpu_ms_per_trigger_no_pages": round(alone * 1000, 2),
        "server_cpu_ms_per_trigger_with_pages": round(watched * 1000, 2),
        "renders_per_page_min_median_max": [
            renders[0],
            statistics.median(renders),
            renders[-1],
        ],
        "trigger_to_html_ms_p50": round(statistics.median(latencies), 1),
        "trigger_to_html_ms_max": round(max(latencies), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--latency", type=int, default=20)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
