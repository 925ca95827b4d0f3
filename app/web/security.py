"""Who is calling and may they: session cookies, CSRF, principals, and the role checks every route declares.

Passwords and API tokens themselves are account matters (app.services.accounts); this module reads
the credentials a request carries and turns them into a principal.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.common.expiring import ExpiringMap
from app.config import Settings, get_settings
from app.data.db import read_session
from app.data.models import ROLES, User
from app.services.accounts import TokenExpired, user_for_token

SESSION_COOKIE = "prefloop_session"
CSRF_COOKIE = "prefloop_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

# ---------------------------------------------------------------- sessions


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key, salt="prefloop-session")


def make_session_cookie(user: User, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return _serializer(settings).dumps({"uid": user.id, "gen": user.session_generation})


def session_cookie_identity(cookie: str, settings: Settings | None = None) -> tuple[int, int] | None:
    """(user id, session generation) of a cookie this server signed and that has not expired, else None.

    Checks the signature only; whether the user still exists, is active and has not logged out since
    (a newer generation) is for the database, see current_principal.
    """
    settings = settings or get_settings()
    try:
        data = _serializer(settings).loads(cookie, max_age=settings.session_max_age_seconds)
    except BadSignature:
        return None
    uid, gen = data.get("uid"), data.get("gen")
    return (uid, gen) if isinstance(uid, int) and isinstance(gen, int) else None


# ---------------------------------------------------------------- CSRF (signed double-submit cookie)


def new_csrf_token(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    nonce = secrets.token_urlsafe(16)
    mac = hmac.new(settings.secret_key.encode(), nonce.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{nonce}.{mac}"


def csrf_token_is_valid(token: str | None, settings: Settings | None = None) -> bool:
    settings = settings or get_settings()
    if not token or "." not in token:
        return False
    nonce, mac = token.rsplit(".", 1)
    expected = hmac.new(settings.secret_key.encode(), nonce.encode(), hashlib.sha256).hexdigest()[:32]
    return hmac.compare_digest(mac, expected)


def csrf_token_for(request: Request) -> str:
    """The request's CSRF token: the cookie's if valid, else a fresh one (set by middleware on the response)."""
    existing = request.cookies.get(CSRF_COOKIE)
    if csrf_token_is_valid(existing):
        return existing  # type: ignore[return-value]
    token = getattr(request.state, "new_csrf_token", None)
    if token is None:
        token = new_csrf_token()
        request.state.new_csrf_token = token
    return token


async def check_csrf(request: Request) -> None:
    """Unsafe browser requests must echo the CSRF cookie in a header (htmx) or a form field."""
    if request.method in SAFE_METHODS or request.headers.get("authorization", "").lower().startswith(
        "bearer "
    ):
        return
    cookie = request.cookies.get(CSRF_COOKIE)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        sent = form.get(CSRF_FIELD)  # type: ignore[assignment]
    if not (cookie and sent and hmac.compare_digest(cookie, str(sent)) and csrf_token_is_valid(cookie)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "CSRF token missing or invalid; reload the page and submit again."
        )


# ---------------------------------------------------------------- principals and roles


@dataclass(frozen=True)
class Principal:
    id: int
    username: str
    role: str
    via_token: bool
    # When the bearer token used expires: a cached principal is not trusted past it.
    expires_at: datetime | None = None

    def expired(self) -> bool:
        return self.expires_at is not None and datetime.now(UTC) >= self.expires_at


class LoginRequired(HTTPException):
    """Anonymous request: pages redirect to the login form, the API answers 401."""

    def __init__(self) -> None:
        super().__init__(
            status.HTTP_401_UNAUTHORIZED,
            "Authentication required: log in, or send 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


class PrincipalCache(ExpiringMap[Principal]):
    """Principals verified against the database in the last `ttl` seconds, by credential.

    Every API call and page load needs its caller's user row (active? logged out since? which role?);
    reading it each time costs a pooled connection and a round trip before the handler starts. Within
    `ttl` (PREFLOOP_AUTH_CACHE_SECONDS) a credential seen before is answered from memory. Logout and
    the admin users page drop the user's entries in this process at once; another process, or a
    change made outside the web app (`prefloop users ...`, SQL), takes effect within `ttl` seconds.
    A token's expiry is checked on every hit. ttl 0 turns the cache off.
    """

    def __init__(self, ttl: float, max_entries: int = 50_000):
        super().__init__(ttl, max_entries)

    def forget_user(self, user_id: int) -> None:
        self.discard_where(lambda principal: principal.id == user_id)


def principal_cache(request: Request) -> PrincipalCache:
    """The app's cache (one per app, made by create_app, so apps in one process never share entries)."""
    return request.app.state.principal_cache


def _principal_from_db(
    request: Request, kind: str, credential: str, identity: tuple[int, int] | None
) -> Principal | None:
    """The principal of a credential, read from the database (in a short session of its own)."""
    with read_session(request.app.state.sessionmaker) as db:
        expires_at = None
        if kind == "token":
            try:
                found = user_for_token(db, credential)
            except TokenExpired as exc:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
                ) from None
            if found is None:
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Invalid or revoked API token.")
            user, expires_at = found
        else:
            user_id, generation = identity
            user = db.get(User, user_id)
            if user is None or not user.is_active or user.session_generation != generation:
                return None
        return Principal(
            id=user.id,
            username=user.username,
            role=user.role,
            via_token=kind == "token",
            expires_at=expires_at,
        )


async def current_principal(request: Request) -> Principal | None:
    """Who is calling: a bearer token or the session cookie, checked against the database (or the
    principal cache); None for an anonymous request. An invalid bearer token is a 401 right away."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        kind, credential = "token", auth[7:].strip()
    elif cookie := request.cookies.get(SESSION_COOKIE):
        kind, credential = "session", cookie
    else:
        return None
    cache = principal_cache(request)
    # Keyed by the credential itself: a cookie found here had its signature checked when it was put.
    principal = cache.get((kind, credential))
    if principal is not None and principal.expired():
        principal = None  # read again: the token's owner gets the 401 that says it expired
    if principal is None:
        identity = None
        if kind == "session":
            identity = session_cookie_identity(credential, request.app.state.settings)
            if identity is None:
                return None
        principal = await run_in_threadpool(_principal_from_db, request, kind, credential, identity)
        if principal is not None:
            cache.put((kind, credential), principal)
    if principal is not None:
        request.state.principal = principal
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(current_principal)]


def require_role(*roles: str) -> Callable[..., Principal]:
    """Dependency factory: the route is open to these roles only. Routes list it in `dependencies`
    or take its result as a parameter; the route audit test reads `allowed_roles` off it."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {unknown}")

    async def dependency(request: Request, principal: OptionalPrincipal) -> Principal:
        if principal is None:
            raise LoginRequired()
        if principal.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"This needs the {' or '.join(roles)} role; you are signed in as {principal.role}.",
            )
        if not principal.via_token:
            await check_csrf(request)
        return principal

    dependency.allowed_roles = frozenset(roles)  # type: ignore[attr-defined]
    return dependency


def public(request: Request) -> None:
    """Marks a route as deliberately open to anonymous users (login, health)."""


public.allowed_roles = frozenset({"anonymous"})  # type: ignore[attr-defined]

ANNOTATE_ROLES = ("annotator", "admin")
EXPORT_ROLES = ("researcher", "admin")
ANY_ROLE = ROLES

Annotator = Annotated[Principal, Depends(require_role(*ANNOTATE_ROLES))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
Researcher = Annotated[Principal, Depends(require_role(*EXPORT_ROLES))]
AnyUser = Annotated[Principal, Depends(require_role(*ANY_ROLE))]
