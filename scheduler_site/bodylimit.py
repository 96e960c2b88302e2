"""A cap on HTTP request bodies, applied before anything reads them.

Django's ASGI handler reads a whole body into memory (or a spooled temporary
file) before DATA_UPLOAD_MAX_MEMORY_SIZE is ever looked at, and the trigger
endpoints are Channels consumers that Django's limits do not cover at all. So
the limit is enforced here, outside every app: a declared Content-Length over
the limit is answered 413 without reading a byte of the body, and a body sent
without one (chunked) is counted as it arrives and cut off once it passes the
limit: the app is told the client went away, and the client gets the 413.
"""

from __future__ import annotations

import io
import json

TOO_LARGE = "request body over {limit} bytes"


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body larger than `limit` bytes
    (JSON under /api/, plain text elsewhere)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is None or declared > self.limit:
            # Unparseable or too large: refused before reading. (RFC 9112 6.3:
            # an invalid Content-Length is an unrecoverable error; daphne's
            # parser refuses most of them before we see them anyway.)
            return await self._refuse(scope, send)
        return await _Capped(self, scope, receive, send).run()

    async def _refuse(self, scope, send) -> None:
        message = TOO_LARGE.format(limit=self.limit)
        if scope.get("path", "").startswith("/api/"):
            body = json.dumps({"error": message}).encode()
            content_type = b"application/json"
        else:
            body = message.encode() + b"\n"
            content_type = b"text/plain; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is not read: the connection cannot be reused.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    """The declared length; 0 without the header; None when it is not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return 0


class _Capped:
    """One request whose body is counted as the app reads it."""

    def __init__(self, limit: BodyLimit, scope, receive, send) -> None:
        self.limit, self.scope, self.receive, self.send = limit, scope, receive, send
        self.received = 0
        self.refused = False

    async def run(self) -> None:
        await self.limit.app(self.scope, self._receive, self._send)

    async def _receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.limit:
                # Stop reading: the app drops what it has (a disconnect) and
                # whatever it then sends is swallowed; the client gets the 413.
                self.refused = True
                await self.limit._refuse(self.scope, self.send)
                return {"type": "http.disconnect"}
        return message

    async def _send(self, message) -> None:
        if not self.refused:
            await self.send(message)


def daphne_http_factory(limit: int):
    """daphne's HTTP factory, its requests refusing a body over `limit` bytes
    as it arrives.

    Twisted (under daphne) receives a whole request body, spooling it to a
    temporary file past 100 kB, before the ASGI application is even called: by
    the time BodyLimit sees the request, a 10 GB upload has already been
    written to /tmp. These requests answer 413 and close the connection as
    soon as the headers declare too much, or as soon as a chunked body passes
    the limit, and keep none of it.
    """
    from daphne.http_protocol import HTTPFactory, WebRequest

    class CappedRequest(WebRequest):
        refused = False
        received = 0

        def gotLength(self, length):
            if length is not None and length > limit:
                self._refuse()
                # No "100 Continue" after the refusal (HTTPChannel sends it
                # right after this call when the client asked for one).
                self.requestHeaders.removeHeader(b"Expect")
                return
            super().gotLength(length)

        def handleContentChunk(self, data):
            if self.refused:
                return
            self.received += len(data)
            if self.received > limit:
                self._refuse()
                return
            super().handleContentChunk(data)

        def _refuse(self) -> None:
            self.refused = True
            self.content = io.BytesIO()  # nothing spooled; process() never runs
            # Twisted sets self.uri only once the body is in; the request line
            # is on the channel (a private name, read defensively).
            path = (getattr(self.channel, "_path", None) or b"").split(b"?", 1)[0]
            message = TOO_LARGE.format(limit=limit)
            if path.startswith(b"/api/"):
                body, content_type = json.dumps({"error": message}).encode(), b"application/json"
            else:
                body, content_type = message.encode() + b"\n", b"text/plain; charset=utf-8"
            transport = self.channel.transport
            transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Type: "
                + content_type
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            # Stops reading at once; what was written is still sent.
            transport.loseConnection()

    class CappedHTTPFactory(HTTPFactory):
        def buildProtocol(self, addr):
            protocol = super().buildProtocol(addr)
            protocol.requestFactory = CappedRequest
            return protocol

    return CappedHTTPFactory
