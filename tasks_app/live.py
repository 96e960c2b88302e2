"""Live regions of dashboard pages: which events touch them, and rendering them for a socket.

A page marks each region it keeps current with `data-live-src` (the URL of
its partial: the one the page got it from) and `data-live-on` (topics). The
browser's socket (tasks_app.consumers.LiveConsumer) names its regions; on an
`events.committed` message `affected` says which of them changed, and
`render` produces their new HTML on the server by calling the region's view
as an htmx request of the socket's user: the views' own role checks, queries
and templates, no second copy of any markup.

Topics of `data-live-on`:
- `runs`, `attempts`, `tasks`, `workers`, `scheduler`: any event of that kind
  (`run.*`, `attempt.*`, ...);
- `run:<id>`, `task:<id>`, `worker:<id>`: the events that name that run
  (its `run.*` and `attempt.*` events), that task (any event with its
  task_id) or that worker (any event with its worker_id).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import Resolver404, resolve
from django_htmx.middleware import HtmxDetails

from tasks_app import events

# The header that tells a view its partial is rendered for a live socket:
# the run page then leaves out the output the page already holds.
LIVE_HEADER = "X-Live-Region"
MAX_REGIONS = 20
MAX_SRC = 2000
TOPIC = re.compile(r"^(runs|attempts|tasks|workers|scheduler|(run|task|worker):\d{1,18})$")
# kind prefix -> the plain topic it belongs to
PLAIN = {
    "run": "runs",
    "attempt": "attempts",
    "task": "tasks",
    "worker": "workers",
    "scheduler": "scheduler",
}


class InvalidRegion(ValueError):
    """A region a page asked for that cannot be watched (a bad id, URL or topic)."""


@dataclass(frozen=True)
class Region:
    id: str
    src: str
    on: frozenset[str]


def parse_regions(raw: object) -> dict[str, Region]:
    """The regions of a watch message, strictly: any fault is an InvalidRegion."""
    if not isinstance(raw, list) or len(raw) > MAX_REGIONS:
        raise InvalidRegion(f"regions must be a list of at most {MAX_REGIONS}")
    regions = {}
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidRegion("a region is an object with id, src and on")
        rid, src, on = item.get("id"), item.get("src"), item.get("on")
        if not isinstance(rid, str) or not 0 < len(rid) <= 100:
            raise InvalidRegion("a region's id is a string of 1 to 100 characters")
        if not isinstance(src, str) or not src.startswith("/") or len(src) > MAX_SRC:
            raise InvalidRegion(f"region {rid}: src is a path of this site")
        if not isinstance(on, str):
            raise InvalidRegion(f"region {rid}: on is a string of topics")
        topics = frozenset(on.split())
        bad = sorted(t for t in topics if not TOPIC.match(t))
        if bad or not topics:
            raise InvalidRegion(f"region {rid}: unknown topic(s) {bad or on!r}")
        if not _is_dashboard_view(src):
            raise InvalidRegion(f"region {rid}: {src} is not a dashboard page")
        regions[rid] = Region(rid, src, topics)
    return regions


def _is_dashboard_view(src: str) -> bool:
    """Only views that declare a role (roles.role_required) render for a socket:
    not the API, the admin or anything that is not a page of ours."""
    try:
        match = resolve(urlsplit(src).path)
    except Resolver404:
        return False
    return getattr(match.func, "required_role", None) is not None


def affected(regions: Iterable[Region], message: Mapping) -> set[str]:
    """Ids of the regions an `events.committed` message (or a Summary's) touches."""
    kinds = message.get("kinds") or []
    prefixes = {kind.partition(".")[0] for kind in kinds}
    plain = {PLAIN[p] for p in prefixes if p in PLAIN}
    runs, tasks, workers = message.get("runs"), message.get("tasks"), message.get("workers")
    runs = None if runs is None else set(runs)
    tasks = None if tasks is None else set(tasks)
    workers = None if workers is None else set(workers)
    hit = set()
    for region in regions:
        for topic in region.on:
            name, _, number = topic.partition(":")
            if not number:
                touched = topic in plain
            elif name == "run":
                touched = bool(prefixes & {"run", "attempt"}) and _names(runs, int(number))
            elif name == "task":
                touched = _names(tasks, int(number))
            else:
                touched = _names(workers, int(number))
            if touched:
                hit.add(region.id)
                break
    return hit


def _names(ids: set[int] | None, pk: int) -> bool:
    return ids is None or pk in ids


def missed(since: int, limit: int = 1000) -> dict:
    """What happened after event `since`, as an `events.committed` message: the
    catch-up of a page that reconnects (more than `limit` events: everything)."""
    rows = events.after(since, limit=limit + 1)
    summary = events.Summary()
    if rows:
        summary.add(rows[:limit], rows[-1].id)
    message = summary.message()
    if len(rows) > limit:
        message.update(runs=None, tasks=None, workers=None, kinds=sorted(events.KINDS))
    return message


class _Discarded:
    """Message storage of a live render: a flash a view adds ("filter ignored")
    was meant for the page load that showed it, not for every re-render."""

    def add(self, *args, **kwargs) -> None:
        pass

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def request_for(scope: Mapping, user, src: str, page: str = "") -> ASGIRequest:
    """An htmx GET of `src` as the socket's browser would make it from `page`
    (HX-Current-URL): its host and cookies (so forms in the partial carry a
    CSRF token that matches its cookie), its session and its user."""
    parts = urlsplit(src)
    keep = {b"host", b"cookie", b"user-agent", b"accept-language"}
    headers = [(name, value) for name, value in scope.get("headers", []) if name in keep]
    headers += [(b"hx-request", b"true"), (LIVE_HEADER.lower().encode(), b"1")]
    if page:
        headers.append((b"hx-current-url", page.encode("latin-1", "replace")))
    http_scope = {
        "type": "http",
        "method": "GET",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "root_path": scope.get("root_path", ""),
        "query_string": parts.query.encode(),
        "headers": headers,
        "scheme": "https" if scope.get("scheme") == "wss" else "http",
        "server": scope.get("server"),
        "client": scope.get("client"),
    }
    request = ASGIRequest(http_scope, io.BytesIO())
    request.user = user
    session = scope.get("session")
    if session is not None:
        request.session = session
    request._messages = _Discarded()
    request.htmx = HtmxDetails(request)
    CsrfViewMiddleware(lambda r: None).process_request(request)
    return request


def render(scope: Mapping, user, src: str, page: str = "") -> str | None:
    """The region's HTML as its view answers it now, or None when the view
    refuses (gone: 404; the user lost the role: 403; a redirect)."""
    parts = urlsplit(src)
    try:
        match = resolve(parts.path)
    except Resolver404:
        return None
    request = request_for(scope, user, src, page)
    request.resolver_match = match
    try:
        response = match.func(request, *match.args, **match.kwargs)
    except (Http404, PermissionDenied):
        return None
    if response.status_code != 200:
        return None
    if hasattr(response, "render"):
        response.render()
    return response.content.decode(response.charset or "utf-8")


class LiveSince:
    """Puts the newest event's id in `request.live_since` for a dashboard page,
    before its view reads anything: the page's socket catches up from there,
    so an event committed while the page was being rendered is not lost."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if (
            request.method == "GET"
            and getattr(view_func, "required_role", None)
            and not getattr(request, "htmx", False)
        ):
            request.live_since = events.last_id()
