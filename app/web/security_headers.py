"""Security headers on every response: Content-Security-Policy (per path), framing, sniffing,
referrer, and HSTS in production.

The pages load scripts and styles from /static only: no inline script, no inline style, no event
handler attributes, so a string that slips past escaping still cannot run script. The API docs
pages (/docs, /redoc) start their viewer with an inline script, so they get a policy of their own
that allows it; they show only the app's own OpenAPI schema, never stored user text.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Every page: our own scripts, styles, images and fetches; no plugins; forms post back to us; never
# framed (promote, rollback and cancel are one-click forms, so framing would invite clickjacking).
PAGE_POLICY = (
    "default-src 'self'; "
    "script-src 'self'; "
    "style-src 'self'; "
    "img-src 'self' data:; "
    "font-src 'self'; "
    "connect-src 'self'; "
    "object-src 'none'; "
    "base-uri 'none'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)

# Swagger UI and Redoc, served from /static: each page starts its viewer with an inline script and
# styles itself inline; Redoc runs its search in a blob: worker. Only the schema is shown there.
DOCS_POLICY = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; "
    "font-src 'self' data:; "
    "connect-src 'self'; "
    "worker-src 'self' blob:; "
    "object-src 'none'; "
    "base-uri 'none'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)

# Path prefixes with a policy other than PAGE_POLICY, first match wins.
POLICY_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("/docs", DOCS_POLICY),
    ("/redoc", DOCS_POLICY),
)

# A year, as browsers' preload lists ask; only sent in production, where the app is behind HTTPS.
HSTS = "max-age=31536000; includeSubDomains"


def policy_for(path: str) -> str:
    """The Content-Security-Policy of a request path."""
    for prefix, policy in POLICY_BY_PREFIX:
        if path == prefix or path.startswith(prefix + "/"):
            return policy
    return PAGE_POLICY


class SecurityHeaders:
    """Adds the headers to every HTTP response (a header a route set itself is kept).

    Plain ASGI: it only touches the response start, like the CSRF cookie middleware.
    """

    def __init__(self, app: ASGIApp, *, production: bool) -> None:
        self.app = app
        self.production = production

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = policy_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", policy)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
                if self.production:
                    headers.setdefault("Strict-Transport-Security", HSTS)
            await send(message)

        await self.app(scope, receive, send_with_headers)
