"""Request bodies bounded at the HTTP layer, before any route reads or parses them: `mmstack serve` and the web
demo both wrap their ASGI app in `BodyLimit`."""
from __future__ import annotations

import json
from typing import Optional


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before the route reads (or
    parses) it, from its Content-Length or, for a chunked body, as soon as the bytes received pass the limit.
    File uploads (`multipart/form-data`) may have their own, larger `upload_limit`. The rest of a refused body
    (up to `drain` bytes) is read and dropped, never kept, so that the client, still sending, gets to read the
    413 instead of a reset connection."""

    def __init__(self, app, limit: int, upload_limit: Optional[int] = None, drain: int = 256 * 1024 * 1024):
        self.app, self.json_limit, self.drain = app, limit, drain
        self.upload_limit = upload_limit or limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        self_limit = self.upload_limit if multipart else self.json_limit
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self_limit):
            await self._discard(receive, 0)
            return await self._refuse(send, self_limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self_limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._discard(receive, seen)
            await self._refuse(send, self_limit)

    async def _discard(self, receive, seen: int) -> None:
        more = True
        while more and seen <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, send, limit: int):
        body = json.dumps({"error": {"message": f"the request body is larger than the limit of {limit} bytes",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
