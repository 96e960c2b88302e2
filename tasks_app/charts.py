"""Charts drawn as SVG on the server: a stacked bar chart and a sparkline.

No JavaScript library and no CDN: the page carries the picture itself, so it
shows the same with JavaScript off and swaps in whole with its htmx partial.
Every bar has a <title> (the browser's tooltip, and what a screen reader
reads), the chart a <title> and <desc> summing it up. Colours are CSS
classes (`.bar.succeeded`) whose fills come from CSS variables
(`--chart-succeeded`), so a dark theme restyles them without touching this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

# The bars' drawing units: the SVG stretches to its box (the card's width, a
# fixed height), so its figures and labels are HTML beside it, never stretched
# with it (they would be squashed on a phone).
WIDTH = 600
HEIGHT = 136
PAD_TOP = 6


@dataclass
class Bucket:
    """One bar: a span of time and how many runs ended in it, by status."""

    start: datetime
    label: str  # what its tooltip calls it: "14:05 UTC"
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _words(counts: dict[str, int], statuses: Sequence[str]) -> str:
    said = [f"{counts[s]} {s.replace('_', ' ')}" for s in statuses if counts.get(s)]
    return ", ".join(said) or "none"


def stacked_bars(
    buckets: Sequence[Bucket],
    statuses: Sequence[str],
    *,
    title: str,
    ticks: Sequence[tuple[int, str]] = (),
    chart_id: str = "chart",
) -> SafeString:
    """Bars side by side, one per bucket, each a stack of one rect per status
    with runs (in `statuses` order from the bottom). `ticks` are (bucket
    index, text) for the x axis.

    A <figure>: the y axis' figures, the SVG of the bars, the x axis' labels.
    """
    top = max((b.total for b in buckets), default=0)
    scale_top = max(top, 1)
    plot_h = HEIGHT - PAD_TOP
    step = WIDTH / max(len(buckets), 1)
    gap = min(2.0, step * 0.2)
    totals = {s: sum(b.counts.get(s, 0) for b in buckets) for s in statuses}
    desc = f"{sum(totals.values())} runs: {_words(totals, statuses)}."
    parts: list[str] = []
    for index, bucket in enumerate(buckets):
        x = index * step + gap / 2
        y = HEIGHT
        rects = []
        for status in statuses:
            count = bucket.counts.get(status, 0)
            if not count:
                continue
            h = count / scale_top * plot_h
            y -= h
            rects.append(
                format_html(
                    '<rect class="bar {}" x="{}" y="{}" width="{}" height="{}">'
                    "<title>{}: {} {}</title></rect>",
                    status,
                    f"{x:.2f}",
                    f"{y:.2f}",
                    f"{step - gap:.2f}",
                    f"{h:.2f}",
                    bucket.label,
                    count,
                    status.replace("_", " "),
                )
            )
        # A column the height of the plot behind the stack: the whole bucket's
        # tooltip, also where the bucket has no runs at all.
        parts.append(
            format_html(
                '<g class="bucket" data-start="{}" data-total="{}">'
                '<rect class="hit" x="{}" y="{}" width="{}" height="{}">'
                "<title>{}: {}</title></rect>{}</g>",
                bucket.start.isoformat(),
                bucket.total,
                f"{x:.2f}",
                PAD_TOP,
                f"{step - gap:.2f}",
                plot_h,
                bucket.label,
                _words(bucket.counts, statuses),
                mark_safe("".join(rects)),
            )
        )
    labels = format_html_join(
        "",
        '<span class="tick {}" style="left: {}%">{}</span>',
        # The first and last labels are held inside the chart rather than cut by its edge.
        (
            (_anchor(i, len(buckets)), f"{(i + 0.5) / max(len(buckets), 1) * 100:.2f}", text)
            for i, text in ticks
        ),
    )
    return format_html(
        '<figure class="chart" id="{id}">'
        '<div class="chart-y" aria-hidden="true"><span class="tick">{top}</span>'
        '<span class="tick">0</span></div>'
        '<svg class="chart-plot" viewBox="0 0 {w} {h}" role="img" '
        'aria-labelledby="{id}-title {id}-desc" preserveAspectRatio="none">'
        '<title id="{id}-title">{title}</title><desc id="{id}-desc">{desc}</desc>'
        '{bars}<line class="axis" x1="0" y1="{base}" x2="{w}" y2="{base}"'
        ' vector-effect="non-scaling-stroke"/></svg>'
        '<div class="chart-x" aria-hidden="true">{labels}</div></figure>',
        id=chart_id,
        top=top,
        w=WIDTH,
        h=HEIGHT,
        # Half a unit up: a line on the box's edge would be cut in half by it.
        base=HEIGHT - 0.5,
        title=title,
        desc=desc,
        bars=mark_safe("".join(parts)),
        labels=labels,
    )


SPARK_W = 300
SPARK_H = 48
SPARK_PAD = 4


def sparkline(
    points: Sequence[tuple[float, str]], *, title: str, chart_id: str = "spark"
) -> SafeString:
    """A line through `points` (value, tooltip), left to right, scaled from 0
    to the largest value; each point a dot with its tooltip."""
    if not points:
        return mark_safe("")
    top = max(value for value, _ in points) or 1.0
    count = len(points)
    step = (SPARK_W - 2 * SPARK_PAD) / max(count - 1, 1)
    coords = []
    for index, (value, _) in enumerate(points):
        x = SPARK_PAD + index * step if count > 1 else SPARK_W / 2
        y = SPARK_H - SPARK_PAD - value / top * (SPARK_H - 2 * SPARK_PAD)
        coords.append((x, y))
    line = " ".join(f"{x:.2f},{y:.2f}" for x, y in coords)
    dots = format_html_join(
        "",
        '<circle class="dot" cx="{}" cy="{}" r="2.5"><title>{}</title></circle>',
        ((f"{x:.2f}", f"{y:.2f}", text) for (x, y), (_, text) in zip(coords, points, strict=True)),
    )
    return format_html(
        '<svg class="sparkline" id="{id}" viewBox="0 0 {w} {h}" role="img" '
        'aria-labelledby="{id}-title"><title id="{id}-title">{title}</title>'
        '<polyline class="line" fill="none" points="{line}"/>{dots}</svg>',
        id=chart_id,
        w=SPARK_W,
        h=SPARK_H,
        title=title,
        line=line,
        dots=dots,
    )


def _anchor(index: int, count: int) -> str:
    if index == 0:
        return "start"
    return "end" if index == count - 1 else "middle"
