"""Request body size limits, enforced before a byte too many is read.

FastAPI reads and parses a request's body before it runs the route's dependencies (role, CSRF), so a
limit checked in a route comes too late: the body would already be in memory or, for an upload, on
disk. This middleware checks the declared Content-Length and counts the bytes as they stream in, and
answers 413 with a message as soon as either is over the limit of the route and the caller:

- callers who are not signed in get the smallest limit (the login form is all they may send);
- signed-in callers get the general limit;
- a few routes take large bodies (prompt-set uploads) from the roles that may use them.

Who is calling is only looked up once a body is larger than the anonymous limit, so the small
requests of the hot path pay nothing for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.web.security import current_principal

# Multipart framing and the form fields around an uploaded file.
UPLOAD_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class LargeBodyRoute:
    """A route that takes bodies above the general limit, from these roles only."""

    method: str
    path: re.Pattern[str]
    limit: int
    roles: frozenset[str]


@dataclass(frozen=True)
class BodyLimits:
    anonymous: int
    signed_in: int
    large_routes: tuple[LargeBodyRoute, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        upload = settings.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
        admin = frozenset({"admin"})
        return cls(
            anonymous=settings.max_anonymous_body_bytes,
            signed_in=settings.max_body_bytes,
            large_routes=(
                LargeBodyRoute("POST", re.compile(r"/admin/prompts"), upload, admin),
                LargeBodyRoute("POST", re.compile(r"/api/prompt-sets"), upload, admin),
            ),
        )

    def for_caller(self, method: str, path: str, role: str | None) -> int:
        """The limit of this route for a caller of this role (None: not signed in)."""
        if role is None:
            return self.anonymous
        for route in self.large_routes:
            if route.method == method and route.path.fullmatch(path) and role in route.roles:
                return max(route.limit, self.signed_in)
        return self.signed_in


def _size(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n} bytes"


class BodyTooLarge(HTTPException):
    """413, raised from the body stream: FastAPI passes HTTPExceptions of body reading through to
    the app's error handler (JSON for the API, the error page for a browser)."""

    def __init__(self, limit: int, signed_in: bool) -> None:
        if signed_in:
            detail = (
                f"The request body is larger than {_size(limit)}, the limit of this address; "
                "send less (split a large prompt set into several files)."
            )
        else:
            detail = (
                f"The request body is larger than {_size(limit)}, the limit for callers who are not "
                "signed in; log in or send an API token first."
            )
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, detail)


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the server refuses a malformed Content-Length before the app sees it


class BodySizeLimit:
    """Applies BodyLimits to every HTTP request."""

    def __init__(self, app: ASGIApp, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        declared = _declared_length(scope)
        caller_limit: int | None = None
        signed_in = False
        received = 0
        started = False

        async def limit_for_caller() -> int:
            nonlocal caller_limit, signed_in
            if caller_limit is None:
                try:
                    principal = await current_principal(Request(scope))
                except HTTPException:
                    principal = None  # an invalid token: treated as not signed in
                signed_in = principal is not None
                role = principal.role if principal else None
                caller_limit = limits.for_caller(scope["method"], scope["path"], role)
            return caller_limit

        async def over(size: int) -> bool:
            return size > limits.anonymous and size > await limit_for_caller()

        async def limited_receive() -> Message:
            nonlocal received, declared
            if declared is not None:
                length, declared = declared, None  # checked once, before the first read
                if await over(length):
                    raise BodyTooLarge(await limit_for_caller(), signed_in)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if await over(received):
                    raise BodyTooLarge(await limit_for_caller(), signed_in)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            # Read outside a route (no error handler on the way): answer here.
            if started:
                raise
            await _send_json(send, exc.status_code, exc.detail)


async def _send_json(send: Send, status_code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
