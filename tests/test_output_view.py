"""The output viewer: stored chunks as numbered, coloured, escaped lines
(tasks_app.output_view), the run page that shows them, and the raw download."""

from __future__ import annotations

import json
import re
from html import unescape

import pytest

from tasks_app import lifecycle, output_view
from tasks_app.models import Attempt, LogChunk, Run
from tasks_app.output_view import State, render, render_all, tail

OUT = "stdout"
ERR = "stderr"


def line(n: int, html: str, stream: str = OUT, partial: bool = False) -> str:
    kind = "line partial" if partial else "line"
    return f'<span class="{kind}" data-stream="{stream}" data-n="{n}">{html}</span>'


def one(text: str, stream: str = OUT) -> str:
    return render_all([(stream, text)])


# --- colours and attributes -------------------------------------------------------


def test_it_colours_text_and_resets():
    assert one("\x1b[31mred\x1b[0m plain\n") == line(1, '<span class="ansi-fg-1">red</span> plain')


def test_it_renders_bright_background_bold_and_underline_as_classes():
    html = one("\x1b[1;4;92;44mok\x1b[22mthin\x1b[24;49mbare\x1b[39m!\n")
    assert html == line(
        1,
        '<span class="ansi-fg-10 ansi-bg-4 ansi-bold ansi-underline">ok</span>'
        '<span class="ansi-fg-10 ansi-bg-4 ansi-underline">thin</span>'
        '<span class="ansi-fg-10">bare</span>!',
    )


def test_it_renders_256_and_24_bit_colours_inline_in_both_notations():
    html = one(
        "\x1b[38;5;208ma\x1b[38;5;3mb\x1b[48;5;240mc\x1b[0;38;2;1;2;255md"
        "\x1b[38:2::16:32:48me\x1b[38:5:196mf\n"
    )
    assert html == line(
        1,
        '<span style="color:#ff8700">a</span>'
        '<span class="ansi-fg-3">b</span>'
        '<span class="ansi-fg-3" style="background-color:#585858">c</span>'
        '<span style="color:#0102ff">d</span>'
        '<span style="color:#102030">e</span>'
        '<span style="color:#ff0000">f</span>',
    )


def test_inverse_swaps_the_colours():
    assert one("\x1b[7;31mx\x1b[27my\n") == line(
        1, '<span class="ansi-inverse ansi-bg-1">x</span><span class="ansi-fg-1">y</span>'
    )


def test_a_malformed_or_private_sgr_changes_nothing_and_shows_nothing():
    assert one("\x1b[31ma\x1b[3=1mb\x1b[?1mc\x1b[38;5;999md\n") == line(
        1, '<span class="ansi-fg-1">abcd</span>'
    )


# --- what is not shown ----------------------------------------------------------


def test_it_strips_every_other_escape_sequence_and_control_character():
    text = (
        "\x1b]0;window title\x07a\x1b[2K\x1b[1A\x1b[?25lb\x1b(B\x1b7c\x1b]8;;http://x\x1b\\"
        "link\x1b]8;;\x1b\\\x07\x08d\te\x1bZ\x7f\n"
    )
    assert one(text) == line(1, "abclinkd\te")


def test_a_carriage_return_keeps_the_text_after_it_and_the_colours_before_it():
    html = one("\x1b[32m 10%\r 50%\r\x1b[1m100%\r\nnext\r\n")
    assert html == line(1, '<span class="ansi-fg-2 ansi-bold">100%</span>') + line(
        2, '<span class="ansi-fg-2 ansi-bold">next</span>'
    )


def test_it_escapes_html():
    assert one('<script>alert("x")</script> & \x1b[31m<b>\n') == line(
        1, '&lt;script&gt;alert("x")&lt;/script&gt; &amp; <span class="ansi-fg-1">&lt;b&gt;</span>'
    )


def test_empty_lines_are_lines_and_a_last_line_without_newline_is_partial():
    assert one("a\n\nb") == line(1, "a") + line(2, "") + line(3, "b", partial=True)
    assert one("") == ""


# --- across lines and chunks ------------------------------------------------------


def test_colour_carries_across_lines_and_chunks():
    html = render_all([(OUT, "\x1b[33mone\ntw"), (OUT, "o\x1b[0m three\n")])
    assert html == line(1, '<span class="ansi-fg-3">one</span>') + line(
        2, '<span class="ansi-fg-3">two</span> three'
    )


def test_a_line_split_across_chunks_is_one_line_even_mid_escape_sequence():
    pieces = ["\x1b", "[3", "4", "mblu", "e\x1b]0;ti", "tle\x07!", "\x1b[", "0m\n"]
    assert render_all((OUT, p) for p in pieces) == line(1, '<span class="ansi-fg-4">blue!</span>')
    assert render_all((OUT, p) for p in "ab\r\ncd\r\n") == line(1, "ab") + line(2, "cd")


def test_each_stream_has_its_own_lines_and_colours_in_the_order_lines_end():
    chunks = [(OUT, "\x1b[31mhalf "), (ERR, "warn\x1b[1m\n"), (OUT, "done\n"), (ERR, "bold\n")]
    assert render_all(chunks) == (
        line(1, "warn", ERR)
        + line(2, '<span class="ansi-fg-1">half done</span>')
        + line(3, '<span class="ansi-bold">bold</span>', ERR)
    )


def test_rendering_in_pieces_gives_the_markup_of_rendering_at_once():
    chunks = [
        (OUT, "\x1b[35mpro"),
        (ERR, "e1\ne2"),
        (OUT, "gress 1%\r"),
        (OUT, "progress 99%\r\x1b[0mdone\n\x1b[4m"),
        (ERR, "\x1b[3"),
        (ERR, "1m\n"),
        (OUT, "under"),
    ]
    whole = render_all(chunks)
    for cut in range(len(chunks) + 1):
        first, state = render(chunks[:cut])
        # The state travels as JSON to whoever appends the rest (the live page).
        state = State.from_dict(json.loads(json.dumps(state.as_dict())))
        rest, state = render(chunks[cut:], state)
        assert first + rest + tail(state) == whole, cut


def test_render_does_not_change_the_state_it_is_given():
    _, state = render([(OUT, "\x1b[31mab")])
    before = state.as_dict()
    render([(OUT, "cd\n")], state)
    assert state.as_dict() == before


def test_an_endless_progress_line_is_not_held_whole():
    _, state = render((OUT, f"\x1b[36m{i}%\r") for i in range(10_000))
    assert state.streams[OUT].pending == "\x1b[36m9999%\r"
    assert tail(state) == line(1, '<span class="ansi-fg-6">9999%</span>', partial=True)


# --- the run page -----------------------------------------------------------------


def finished_run(task, worker, chunks, *, status=Attempt.Status.SUCCEEDED) -> tuple[Run, Attempt]:
    run = lifecycle.trigger_run(task)
    attempt = run.attempts.get()
    assert lifecycle.assign(attempt.pk, worker.pk, worker.name)
    assert lifecycle.mark_started(worker.pk, attempt.pk, None, pid=1)
    for seq, (stream, data) in enumerate(chunks):
        LogChunk.objects.create(attempt=attempt, seq=seq, stream=stream, data=data)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED)
    Attempt.objects.filter(pk=attempt.pk).update(status=status)
    attempt.refresh_from_db()
    return run, attempt


def output_box(html: str, attempt: Attempt) -> str:
    found = re.search(
        rf'<pre class="log output-lines" id="out-{attempt.pk}" data-seq="(-?\d+)"[^>]*>(.*?)</pre>',
        html,
        flags=re.S,
    )
    assert found, "no output box for the attempt"
    return found.group(2)


@pytest.mark.django_db
def test_the_run_page_shows_numbered_coloured_lines_of_both_streams(bob_client, task, worker):
    run, attempt = finished_run(
        task, worker, [(OUT, "\x1b[31mred\x1b[0m\n"), (ERR, "careful <now>\n"), (OUT, "done\n")]
    )

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert output_box(html, attempt) == (
        line(1, '<span class="ansi-fg-1">red</span>')
        + line(2, "careful &lt;now&gt;", ERR)
        + line(3, "done")
    )
    assert "\x1b" not in html
    assert "{#" not in html  # a template comment left open shows as text
    assert 'data-seq="2"' in html
    assert f'id="output-search-{attempt.pk}"' in html
    assert re.findall(r'data-show="(\w+)" aria-pressed', html) == ["all", "stdout", "stderr"]
    assert (
        f'href="/runs/{run.pk}/attempts/{attempt.pk}/output.txt" download>Download raw</a>' in html
    )
    assert "js/output.js" in html


@pytest.mark.django_db
def test_the_run_page_says_when_output_was_truncated(bob_client, task, worker):
    run, attempt = finished_run(task, worker, [(OUT, "abc")])
    Attempt.objects.filter(pk=attempt.pk).update(truncated=True, stored_bytes=3, output_bytes=50)

    html = bob_client.get(f"/runs/{run.pk}/").content.decode()

    assert output_box(html, attempt) == line(1, "abc", partial=True)
    assert (
        f'<p class="output-truncated" id="truncated-{attempt.pk}">'
        "[output truncated: kept 3 of 50 bytes]</p>"
    ) in html


@pytest.mark.django_db
def test_the_page_reads_the_output_of_all_shown_attempts_in_one_query(
    bob_client, task, worker, django_assert_max_num_queries
):
    run, attempt = finished_run(task, worker, [(OUT, f"line {i}\n") for i in range(500)])
    shown = output_view.shown_outputs([attempt.pk, 999_999])

    assert shown[999_999] == output_view.Shown("", -1)
    assert shown[attempt.pk].seq == 499
    assert unescape(re.sub(r"<[^>]+>", "\n", shown[attempt.pk].html)).split() == [
        w for i in range(500) for w in ("line", str(i))
    ]
    with django_assert_max_num_queries(1):
        output_view.shown_outputs([attempt.pk])


# --- the raw download -------------------------------------------------------------

RAW = [(OUT, "\x1b[31mred\x1b[0m\r\n"), (ERR, "oops \u00e9\n"), (OUT, "50%\r100%\n")]


def download(client, run, attempt, query: str = ""):
    return client.get(f"/runs/{run.pk}/attempts/{attempt.pk}/output.txt{query}")


@pytest.mark.django_db
def test_the_download_streams_the_stored_bytes_as_an_attachment(bob_client, task, worker):
    run, attempt = finished_run(task, worker, RAW)

    answer = download(bob_client, run, attempt)

    assert answer.status_code == 200
    assert answer.streaming
    assert answer["Content-Type"] == "text/plain; charset=utf-8"
    assert answer["Content-Disposition"] == (
        f'attachment; filename="run-{run.pk}-shard-0-try-1.txt"'
    )
    assert b"".join(answer.streaming_content) == "".join(d for _, d in RAW).encode()


@pytest.mark.django_db
def test_the_download_can_be_one_stream(bob_client, task, worker):
    run, attempt = finished_run(task, worker, RAW)

    answer = download(bob_client, run, attempt, "?stream=stdout")

    assert answer["Content-Disposition"].endswith(
        f'filename="run-{run.pk}-shard-0-try-1-stdout.txt"'
    )
    assert b"".join(answer.streaming_content) == b"\x1b[31mred\x1b[0m\r\n50%\r100%\n"
    errors = download(bob_client, run, attempt, "?stream=stderr")
    assert b"".join(errors.streaming_content) == "oops \u00e9\n".encode()


@pytest.mark.django_db
def test_the_download_refuses_bad_ids_and_parameters(bob_client, task, worker):
    run, attempt = finished_run(task, worker, RAW)
    other = lifecycle.trigger_run(task)

    assert bob_client.get(f"/runs/{other.pk}/attempts/{attempt.pk}/output.txt").status_code == 404
    assert bob_client.get(f"/runs/{run.pk}/attempts/999999/output.txt").status_code == 404
    bad = download(bob_client, run, attempt, "?stream=both")
    assert bad.status_code == 400
    assert bad.content == b"stream must be stdout or stderr (or left out for both)."
    unknown = download(bob_client, run, attempt, "?attempt=1")
    assert unknown.status_code == 400
    assert unknown.content == b"Unknown parameter 'attempt': only 'stream' is taken."


@pytest.mark.django_db
def test_the_download_reads_its_chunks_as_it_sends_them_not_before(bob_client, task, worker):
    run, attempt = finished_run(task, worker, [(OUT, "first\n")])

    answer = download(bob_client, run, attempt)
    # Stored after the answer was made, before it was sent: a view that read
    # the output whole up front would not have it.
    LogChunk.objects.create(attempt=attempt, seq=1, stream=ERR, data="second\n")

    assert b"".join(answer.streaming_content) == b"first\nsecond\n"


@pytest.mark.django_db(transaction=True)
def test_under_asgi_the_download_streams_every_batch_in_order(task, worker, bob):
    # Django's ASGI handler would read a plain iterator whole first: the
    # download goes through results.streamed's async generator there, each
    # batch read in the request's thread; more chunks than one batch holds.
    from django.test import AsyncClient

    from tasks_app import logs
    from tests.engines import in_own_loop

    pieces = [(OUT if i % 3 else ERR, f"piece {i} \x1b[3{i % 8}m\n") for i in range(500)]
    run, attempt = finished_run(task, worker, pieces)
    assert len(pieces) > logs.CHUNKS_PER_READ
    client = AsyncClient()

    async def fetch():
        await client.aforce_login(bob)
        answer = await client.get(f"/runs/{run.pk}/attempts/{attempt.pk}/output.txt")
        parts = [part async for part in answer.streaming_content]
        return answer, parts

    answer, parts = in_own_loop(fetch)

    assert answer.status_code == 200
    assert answer.is_async
    assert b"".join(parts) == "".join(data for _, data in pieces).encode()
    assert len(parts) == len(pieces)  # one chunk at a time, never the whole file at once
