"""An attempt's stored output as HTML lines: numbered, coloured, escaped.

The run page shows output as one `<span class="line" data-stream="stdout|stderr"
data-n="N">` per line, in the order lines were completed, each stream's lines
split on "\\n" on their own (a stdout line cut in two chunks by stderr output
between them is still one line). ANSI SGR codes (16 colours, bright, 256 and
24-bit colours, bold, dim, italic, underline, strike, inverse) become spans
with classes (or an inline colour for the 256/24-bit ones); every other escape
sequence (cursor moves, OSC titles, charsets) and control character is
dropped, and a line rewritten with "\\r" (a progress bar) keeps only the text
after its last "\\r". Nothing raw reaches the page: all text is HTML-escaped.

Incremental by design: the live run page appends new output as it arrives and
must produce exactly the markup a reload would. So

    html, state = render(chunks)                  # the stored chunks so far
    more, state = render(new_chunks, state)       # the lines they complete
    html + more + tail(state)                     # == render(all)[0] + tail(...)

`render()` emits complete lines only; an unfinished line (no "\\n" yet) waits
in the state, with the colour state of each stream, and `tail(state)` renders
those as `<span class="line partial" ...>`, which a live page replaces when
the next chunks arrive. `State.as_dict()` / `State.from_dict()` carry it as
JSON. Colours are tracked per stream, across lines and chunks, as a terminal
would see each stream on its own.

Why our own state machine and not ansi2html: it converts one text at a
time with its colour state reset on every call, its spans cross newlines
(no element per line), and it passes escape sequences it does not know
(private modes such as "\\x1b[?25l", OSC titles) through to the page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from html import escape
from itertools import groupby
from operator import itemgetter

from django.utils.safestring import SafeString, mark_safe

from tasks_app import logs
from tasks_app.models import LogChunk

STREAMS = ("stdout", "stderr")

# ECMA-48 escape sequences, in order of precedence:
ESCAPE = re.compile(
    # CSI (7-bit or 8-bit), e.g. "\x1b[1;31m", "\x1b[2K", "\x1b[?25l"
    r"(?:\x1b\[|\x9b)(?P<params>[0-?]*)[ -/]*(?P<final>[@-~])"
    # a CSI cut off at the end of the text (an unfinished line)
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*\Z"
    # OSC, DCS, SOS, PM, APC strings: up to their terminator, or the end of the line
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"
    # two-character escapes: charsets "\x1b(B", save/restore cursor "\x1b7", ...
    r"|\x1b[ -/]*[0-~]"
    # an ESC with nothing valid after it
    r"|\x1b",
    re.S,
)
# Where an escape sequence may start (ESC, or an 8-bit CSI/OSC/DCS/SOS/PM/APC).
ESCAPE_START = re.compile(r"[\x1b\x90\x98\x9b\x9d-\x9f]")
# Control characters other than tab; "\r" and "\n" are dealt with before.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_CUBE = (0, 95, 135, 175, 215, 255)


@dataclass(frozen=True)
class Style:
    """The SGR attributes in force. A colour is an int 0-15 (a palette class),
    or "#rrggbb" (a 256-colour beyond 15, or 24-bit: an inline style)."""

    fg: int | str | None = None
    bg: int | str | None = None
    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False
    strike: bool = False
    inverse: bool = False


PLAIN = Style()


@dataclass
class StreamState:
    pending: str = ""  # the stream's unfinished line, raw
    style: Style = PLAIN  # the style in force at the start of `pending`


@dataclass
class State:
    """Where rendering stopped: lines emitted so far, and each stream's
    unfinished line and colours."""

    lines: int = 0
    streams: dict[str, StreamState] = field(default_factory=dict)

    def copy(self) -> State:
        return State(self.lines, {k: replace(v) for k, v in self.streams.items()})

    def as_dict(self) -> dict:
        return {
            "lines": self.lines,
            "streams": {
                name: {"pending": s.pending, "style": _style_dict(s.style)}
                for name, s in self.streams.items()
            },
        }

    @classmethod
    def from_dict(cls, data) -> State:
        """The state `as_dict` gave, checked: it comes back from a browser (the
        live run page), so anything else is a ValueError, never markup."""
        if not isinstance(data, dict) or set(data) != {"lines", "streams"}:
            raise ValueError("a state is {lines, streams}")
        lines, streams = data["lines"], data["streams"]
        if type(lines) is not int or lines < 0 or not isinstance(streams, dict):
            raise ValueError("a state's lines is a count and its streams an object")
        state = cls(lines)
        for name, stream in streams.items():
            if name not in STREAMS or not isinstance(stream, dict):
                raise ValueError(f"a state's streams are {', '.join(STREAMS)}")
            pending, style = stream.get("pending"), stream.get("style")
            if not isinstance(pending, str) or len(pending) > MAX_PENDING:
                raise ValueError("a stream's pending line is text")
            state.streams[name] = StreamState(pending, _checked_style(style))
        return state


MAX_PENDING = 1 << 20
COLOUR = re.compile(r"#[0-9a-f]{6}")
FLAGS = ("bold", "dim", "italic", "underline", "strike", "inverse")


def _checked_style(data) -> Style:
    if not isinstance(data, dict) or not set(data) <= {"fg", "bg", *FLAGS}:
        raise ValueError("a style is an object of SGR attributes")
    for key in ("fg", "bg"):
        colour = data.get(key)
        palette = type(colour) is int and 0 <= colour <= 15
        if not (
            colour is None or palette or (isinstance(colour, str) and COLOUR.fullmatch(colour))
        ):
            raise ValueError(f"a style's {key} is 0-15 or #rrggbb")
    if any(type(data.get(flag, False)) is not bool for flag in FLAGS):
        raise ValueError("a style's flags are true or false")
    return Style(**data)


def _style_dict(style: Style) -> dict:
    return {k: v for k, v in style.__dict__.items() if v != getattr(PLAIN, k)}


def render(chunks: Iterable[tuple[str, str]], state: State | None = None) -> tuple[str, State]:
    """The markup of the lines these (stream, data) chunks complete, in seq
    order, after `state` (None: the start of the output); and the new state.
    The state given is not changed."""
    state = state.copy() if state is not None else State()
    out: list[str] = []
    for stream, data in chunks:
        current = state.streams.get(stream)
        if current is None:
            current = state.streams[stream] = StreamState()
        *complete, rest = (current.pending + data).split("\n")
        for raw in complete:
            html, current.style = _line(raw, current.style)
            state.lines += 1
            out.append(_element(stream, state.lines, html))
        current.pending = rest
        _collapse(current)
    return "".join(out), state


def tail(state: State) -> str:
    """The markup of each stream's unfinished line, numbered after the complete ones."""
    out = []
    n = state.lines
    for stream in sorted(state.streams, key=_stream_order):
        current = state.streams[stream]
        if current.pending:
            html, _ = _line(current.pending, current.style)
            n += 1
            out.append(_element(stream, n, html, partial=True))
    return "".join(out)


def render_all(chunks: Iterable[tuple[str, str]]) -> str:
    """The whole output as the page shows it: every line, the unfinished ones last."""
    html, state = render(chunks)
    return html + tail(state)


def render_html(chunks: Iterable[tuple[str, str]]) -> SafeString:
    """render_all, marked safe for a template: all text in it is escaped."""
    return mark_safe(render_all(chunks))


@dataclass(frozen=True)
class Shown:
    """An attempt's output as its page shows it, the last chunk in it (-1:
    none) and the renderer's state after it (JSON, "" at the start), from
    which a live page goes on: its socket renders the next lines from there."""

    html: str
    seq: int
    state: str = ""

    @classmethod
    def empty(cls) -> Shown:
        return cls("", -1)


def shown_outputs(attempt_ids: Sequence[int]) -> dict[int, Shown]:
    """The output of these attempts as the run page shows it, by attempt id:
    one query, its rows read a batch at a time."""
    found: dict[int, Shown] = {}
    for attempt_id, group in groupby(logs.chunks_of(attempt_ids), key=itemgetter(0)):
        rows = list(group)  # one attempt's: the page holds its markup whole anyway
        html, state = render((stream, data) for _, _, stream, data in rows)
        found[attempt_id] = Shown(
            mark_safe(html + tail(state)), rows[-1][1], json.dumps(state.as_dict())
        )
    return {pk: found.get(pk, Shown.empty()) for pk in attempt_ids}


def state_at(attempt_id: int, next_seq: int) -> State:
    """The renderer's state after an attempt's chunks before `next_seq`: for a
    live page that could not give its own back (one read, then it goes on)."""
    if next_seq <= 0:
        return State()
    rows = (
        LogChunk.objects.filter(attempt_id=attempt_id, seq__lt=next_seq)
        .order_by("seq")
        .values_list("stream", "data")
        .iterator(chunk_size=logs.CHUNKS_PER_READ)
    )
    return render(rows)[1]


def _stream_order(name: str) -> tuple[int, str]:
    return (STREAMS.index(name) if name in STREAMS else len(STREAMS), name)


def _element(stream: str, n: int, html: str, *, partial: bool = False) -> str:
    kind = "line partial" if partial else "line"
    return f'<span class="{kind}" data-stream="{escape(stream)}" data-n="{n}">{html}</span>'


def _collapse(current: StreamState) -> None:
    """Drop what a "\\r" already overwrote in an unfinished line (its colours
    kept), so a progress bar that never ends a line is not held whole."""
    kept = current.pending.rstrip("\r")  # a trailing "\r" may be half of "\r\n"
    cut = kept.rfind("\r")
    if cut >= 0:
        current.style = _advance(kept[:cut], current.style)
        current.pending = current.pending[cut + 1 :]


def _line(raw: str, style: Style) -> tuple[str, Style]:
    """One line's markup from `style` on, and the style after it."""
    raw = raw.rstrip("\r")
    if "\r" in raw:
        cut = raw.rfind("\r")
        style = _advance(raw[:cut], style)
        raw = raw[cut + 1 :]
    if not ESCAPE_START.search(raw):  # most lines: no escape sequence at all
        shown = escape(CONTROL.sub("", raw), quote=False)
        if style == PLAIN or not shown:
            return shown, style
        return f"{_open_tag(style)}{shown}</span>", style
    out: list[str] = []
    text: list[str] = []
    current = style
    pos = 0
    for match in ESCAPE.finditer(raw):
        if match.start() > pos:
            text.append(raw[pos : match.start()])
        pos = match.end()
        if match["final"] == "m":
            changed = _sgr(current, match["params"])
            if changed != current:
                _flush(out, text, current)
                current = changed
    if pos < len(raw):
        text.append(raw[pos:])
    _flush(out, text, current)
    return "".join(out), current


def _advance(raw: str, style: Style) -> Style:
    """The style after this text, which is not shown."""
    for match in ESCAPE.finditer(raw):
        if match["final"] == "m":
            style = _sgr(style, match["params"])
    return style


def _flush(out: list[str], text: list[str], style: Style) -> None:
    shown = CONTROL.sub("", "".join(text))
    text.clear()
    if not shown:
        return
    shown = escape(shown, quote=False)
    if style == PLAIN:
        out.append(shown)
        return
    out.append(f"{_open_tag(style)}{shown}</span>")


@lru_cache(maxsize=1024)
def _open_tag(style: Style) -> str:
    classes, css = _classes(style)
    attrs = f' class="{" ".join(classes)}"' if classes else ""
    if css:
        attrs += f' style="{";".join(css)}"'
    return f"<span{attrs}>"


def _classes(style: Style) -> tuple[list[str], list[str]]:
    classes, css = [], []
    fg, bg = (style.bg, style.fg) if style.inverse else (style.fg, style.bg)
    if style.inverse:
        classes.append("ansi-inverse")  # the default colours swapped, in CSS
    for kind, colour in (("fg", fg), ("bg", bg)):
        if isinstance(colour, int):
            classes.append(f"ansi-{kind}-{colour}")
        elif colour is not None:
            css.append(f"{'color' if kind == 'fg' else 'background-color'}:{colour}")
    for name in ("bold", "dim", "italic", "underline", "strike"):
        if getattr(style, name):
            classes.append(f"ansi-{name}")
    return classes, css


@lru_cache(maxsize=4096)  # a program uses a handful of (style, codes) pairs, over and over
def _sgr(style: Style, params: str) -> Style:
    """The style after one SGR sequence ("\\x1b[<params>m"). A private one
    ("\\x1b[?...m") or one with a malformed number changes nothing."""
    if params[:1] in ("<", "=", ">", "?"):
        return style
    parts = params.split(";")
    changes: dict = {}
    i = 0
    try:
        while i < len(parts):
            part = parts[i]
            i += 1
            if ":" in part:  # ISO 8613-6 sub-parameters: 38:5:n, 38:2::r:g:b, 4:3
                sub = [int(x) if x else 0 for x in part.split(":")]
                code = sub[0]
                if code in (38, 48):
                    colour = _extended(sub[1:], colon=True)
                    if colour is not None:
                        changes["fg" if code == 38 else "bg"] = colour
                elif code == 4:
                    changes["underline"] = sub[1] != 0
                continue
            code = int(part) if part else 0
            if code in (38, 48):
                rest = [int(x) if x else 0 for x in parts[i : i + 4]]
                colour = _extended(rest, colon=False)
                i += 2 if rest[:1] == [5] else 4 if rest[:1] == [2] else 0
                if colour is not None:
                    changes["fg" if code == 38 else "bg"] = colour
                continue
            _basic(code, changes)
    except ValueError:
        return style
    if changes.pop("reset", False):
        return replace(PLAIN, **changes)
    return replace(style, **changes) if changes else style


def _basic(code: int, changes: dict) -> None:
    if code == 0:
        changes.clear()
        changes["reset"] = True
    elif code in SET:
        changes[SET[code][0]] = SET[code][1]
    elif 30 <= code <= 37:
        changes["fg"] = code - 30
    elif 40 <= code <= 47:
        changes["bg"] = code - 40
    elif 90 <= code <= 97:
        changes["fg"] = code - 90 + 8
    elif 100 <= code <= 107:
        changes["bg"] = code - 100 + 8
    elif code == 22:
        changes["bold"] = changes["dim"] = False
    # Anything else (blink, hidden, fonts, overline...) is ignored.


SET = {
    1: ("bold", True),
    2: ("dim", True),
    3: ("italic", True),
    4: ("underline", True),
    7: ("inverse", True),
    9: ("strike", True),
    21: ("underline", True),  # doubly underlined
    23: ("italic", False),
    24: ("underline", False),
    27: ("inverse", False),
    29: ("strike", False),
    39: ("fg", None),
    49: ("bg", None),
}


def _extended(values: list[int], *, colon: bool) -> int | str | None:
    """A 256-colour (5;n) or 24-bit (2;r;g;b) colour; None when malformed."""
    if not values:
        return None
    if values[0] == 5 and len(values) >= 2:
        return _palette(values[1])
    if values[0] == 2:
        rgb = values[1:]
        if colon and len(rgb) >= 4:
            rgb = rgb[1:4]  # 38:2:<colour space>:r:g:b
        rgb = rgb[:3]
        if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return None


def _palette(n: int) -> int | str | None:
    if not 0 <= n <= 255:
        return None
    if n < 16:
        return n
    if n < 232:
        n -= 16
        r, g, b = _CUBE[n // 36], _CUBE[n // 6 % 6], _CUBE[n % 6]
    else:
        r = g = b = 8 + 10 * (n - 232)
    return f"#{r:02x}{g:02x}{b:02x}"
