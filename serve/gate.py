"""The ASGI gate in front of the API: who is calling, and how many bytes they send.

FastAPI reads and parses a request's body before it runs any dependency, so a key
check in a dependency comes too late to stop an anonymous client from making the
server read and hold a large body. The gate runs outside the whole app (outside
Starlette's error middleware too) and, before the app sees the request:

- answers 401 to any path but the public ones (page, health, schema) unless the
  ``X-API-Key`` header names a configured key, without reading the body; the
  caller's :class:`serve.config.Principal` goes into the scope for the routes;
- answers 413 when ``Content-Length`` is over the limit, and otherwise counts the
  body bytes actually received (chunked or not) and answers 413 the moment they pass
  the limit, cutting the app off from the rest of the body;
- for ``multipart/form-data``, follows the parts as they arrive and answers 413 as
  soon as one part passes the per-part limit or there are too many parts.

Deny by default: a route added later is authenticated unless it is added to
``PUBLIC_PATHS`` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from serve.config import Principal

PRINCIPAL_SCOPE_KEY = "duet.principal"
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/rank",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)

Scope = dict[str, Any]
Message = dict[str, Any]


class _Refused(Exception):
    """The gate answered the request itself; the app's reading is cut off."""


class _PartCounter:
    """Follows a multipart body chunk by chunk, counting each part's bytes."""

    def __init__(self, boundary: bytes, max_part_bytes: int, max_parts: int):
        MultipartParser = _multipart().MultipartParser  # noqa: N806

        self.max_part_bytes = max_part_bytes
        self.max_parts = max_parts
        self.parts = 0
        self.size = 0
        self.name = b""
        self.too_big: str | None = None
        self.broken = False
        self._header_field = b""
        self._header_value = b""
        callbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_header_end": self._header_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self.parts += 1
        self.size, self.name = 0, b""
        if self.parts > self.max_parts:
            self.too_big = f"more than {self.max_parts} parts in the multipart body"

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > self.max_part_bytes and self.too_big is None:
            name = self.name.decode("latin-1", "replace")[:80] or "a part"
            self.too_big = f"multipart part {name} is over the limit of {self.max_part_bytes} bytes"

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, options = _multipart().parse_options_header(self._header_value)
            self.name = options.get(b"filename") or options.get(b"name") or b""
        self._header_field, self._header_value = b"", b""

    def feed(self, chunk: bytes) -> str | None:
        """The reason to refuse the body so far, or None."""
        if not self.broken and chunk:
            try:
                self.parser.write(chunk)
            except Exception:
                # Malformed multipart: the app's parser (the same library) refuses it
                # with 400; the whole-body limit still holds.
                self.broken = True
        return self.too_big


class RequestGate:
    """ASGI middleware: authentication and received-size limits (see the module doc)."""

    def __init__(
        self,
        app,
        authenticate: Callable[[str | None], Principal | None],
        max_body_bytes: int,
        max_part_bytes: int,
        max_parts: int,
        key_header: str = "X-API-Key",
    ):
        self.app = app
        self.authenticate = authenticate
        self.max_body_bytes = max_body_bytes
        self.max_part_bytes = max_part_bytes
        self.max_parts = max_parts
        self.key_header = key_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.lower(), value)
        if _route_path(scope) not in PUBLIC_PATHS:
            provided = headers.get(self.key_header)
            principal = self.authenticate(provided.decode("latin-1") if provided else None)
            if principal is None:
                await _answer(
                    send, 401, "missing or wrong API key (send it in X-API-Key)",
                    {"www-authenticate": "APIKey"},
                )  # fmt: skip
                return
            scope[PRINCIPAL_SCOPE_KEY] = principal
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _answer(send, 413, self._over_body())
            return
        counter = self._part_counter(headers.get(b"content-type", b""))
        state = {"received": 0, "answered": False, "started": False}

        async def refuse(message: str) -> None:
            if not state["started"]:
                state["answered"] = True
                await _answer(send, 413, message)
            raise _Refused(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                state["received"] += len(body)
                if state["received"] > self.max_body_bytes:
                    await refuse(self._over_body())
                if counter is not None:
                    reason = counter.feed(body)
                    if reason:
                        await refuse(reason)
            return message

        async def guarded_send(message: Message) -> None:
            if state["answered"]:
                return  # the gate already answered; the app's answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise
            # The app failed because the gate cut its body off: already answered.

    def _over_body(self) -> str:
        return f"request body over the limit of {self.max_body_bytes} bytes"

    def _part_counter(self, content_type: bytes) -> _PartCounter | None:
        kind, options = _multipart().parse_options_header(content_type)
        if kind != b"multipart/form-data":
            return None
        boundary = options.get(b"boundary")
        if not boundary:
            return None  # the app refuses it (no boundary)
        return _PartCounter(boundary, self.max_part_bytes, self.max_parts)


def _multipart():
    """python-multipart's parser module (named ``multipart`` before 0.0.13)."""
    try:
        from python_multipart import multipart
    except ImportError:  # pragma: no cover - older python-multipart
        import multipart.multipart as multipart
    return multipart


def _route_path(scope: Scope) -> str:
    """The path the app routes on (below any root path it is mounted at)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


async def _answer(send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": message}).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        # Whatever of the body is still unsent is not wanted: close, do not drain.
        (b"connection", b"close"),
    ]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
