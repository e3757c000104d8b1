"""``max_body_bytes`` for every request, not only step batches.

A declared ``Content-Length`` over the limit is answered 413 before the route runs (and
before anything is read). A chunked body (no length) is read here up to the limit and handed
on, or answered 413 once it passes the limit. The steps route also bounds the body after gzip
decompression (``server.api.ingest``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A refused body is still read (and dropped) up to this many bytes before the 413 goes out:
# closing a connection with unread data makes the kernel reset it, and the client then sees
# "connection reset" instead of the 413 and its message. Past this, the connection is cut.
DRAIN_MAX_BYTES = 64 * 1024 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                if int(declared) <= DRAIN_MAX_BYTES:
                    await _drain(receive, DRAIN_MAX_BYTES)
                await self._reject(send, f"body of {int(declared)} bytes exceeds the limit of "
                                   f"{self.limit} (GRADSENTRY_MAX_BODY_BYTES)")
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_MAX_BYTES - size)
                await self._reject(send, f"body exceeds the limit of {self.limit} bytes "
                                   "(GRADSENTRY_MAX_BODY_BYTES)")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, detail: str) -> None:
        self.on_reject()
        body = json.dumps({"error": "BodyTooLarge", "detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most ``budget`` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return
