"""How long the run page's output renderer takes: `.venv/bin/python tests/bench_output.py`.

Renders a full attempt's worth of output (SCHEDULER_LOG_LIMIT_BYTES, 4 MiB by
default) in 4 KiB chunks, as the agent sends it, plain and coloured, and
prints one JSON object: input and markup size, seconds, lines per second.
Nothing is asserted: machines are noisy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
os.environ.setdefault("SCHEDULER_DATA_DIR", "/tmp/scheduler-bench-output")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402

from tasks_app.output_view import render_all  # noqa: E402

SAMPLES = {
    "plain": "plain line {i} of output, nothing special about it\n",
    "coloured": (
        "\x1b[32m12:00:{s:02d}\x1b[0m INFO \x1b[1mworker\x1b[22m item {i} in 12 ms <ok>\n"
    ),
    "progress": "\x1b[36mdownloading {i} of many\x1b[0m\r",
}


def measure(kind: str, limit: int) -> dict:
    text, i = [], 0
    size = 0
    while size < limit:
        line = SAMPLES[kind].format(i=i, s=i % 60)
        text.append(line)
        size += len(line.encode())
        i += 1
    data = "".join(text)
    chunks = [("stdout", data[at : at + 4096]) for at in range(0, len(data), 4096)]
    started = time.perf_counter()
    html = render_all(chunks)
    took = time.perf_counter() - started
    return {
        "input_mib": round(size / 2**20, 2),
        "lines_in": i,
        "markup_mib": round(len(html.encode()) / 2**20, 2),
        "seconds": round(took, 3),
        "lines_per_second": round(i / took),
    }


def main() -> None:
    limit = settings.SCHEDULER_LOG_LIMIT_BYTES
    print(json.dumps({kind: measure(kind, limit) for kind in SAMPLES}, indent=2))


if __name__ == "__main__":
    main()
