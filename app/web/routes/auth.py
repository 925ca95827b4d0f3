"""Login form, logout, and the landing page that sends each role where it works."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import update

from app.data.db import read_session
from app.data.models import User
from app.services.accounts import authenticate
from app.web.deps import DbSession
from app.web.rate_limits import RateLimited, client_address, rate_limits
from app.web.security import (
    SESSION_COOKIE,
    AnyUser,
    OptionalPrincipal,
    check_csrf,
    make_session_cookie,
    principal_cache,
    public,
)
from app.web.templating import render

router = APIRouter(tags=["auth"])

HOME_BY_ROLE = {"annotator": "/annotate", "admin": "/admin", "researcher": "/research"}


def _safe_next(target: str | None) -> str | None:
    # Only same-site paths: never redirect to another host after login.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return None


@router.get("/", dependencies=[Depends(public)], include_in_schema=False)
def landing(principal: OptionalPrincipal) -> RedirectResponse:
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse(HOME_BY_ROLE[principal.role], status_code=303)


@router.get("/login", dependencies=[Depends(public)], include_in_schema=False)
def login_form(request: Request, next: str | None = None):
    return render(request, "login.html", {"next": _safe_next(next) or "", "error": None, "username": ""})


def _check_password(request: Request, username: str, password: str) -> User | None:
    """The user, when the password is right (a worker thread: argon2 takes tens of milliseconds)."""
    with read_session(request.app.state.sessionmaker) as db:
        return authenticate(db, username, password)


def _login_limiter(request: Request) -> anyio.CapacityLimiter:
    """Threads of the login route's own: a login flood queues here, not in the pool every sync
    handler shares (made on first use, inside the event loop it belongs to)."""
    state = request.app.state
    if getattr(state, "login_limiter", None) is None:
        state.login_limiter = anyio.CapacityLimiter(state.settings.login_concurrency)
    return state.login_limiter


@router.post("/login", dependencies=[Depends(public), Depends(check_csrf)], include_in_schema=False)
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "",
):
    username = username.strip()
    limits = rate_limits(request)
    wait = await limits.login_attempt(client_address(request), username)
    if wait is not None:
        refusal = RateLimited(wait, "login attempts")
        context = {"next": _safe_next(next) or "", "error": refusal.detail}
        page = render(request, "login.html", context, status_code=refusal.status_code)
        page.headers.update(refusal.headers or {})
        return page
    user = await anyio.to_thread.run_sync(
        _check_password, request, username, password, limiter=_login_limiter(request)
    )
    if user is None:
        await limits.login_failed(username)
        # The username stays in the form: a mistyped password should not cost retyping both.
        context = {
            "next": _safe_next(next) or "",
            "error": "Unknown user or wrong password.",
            "username": username.strip(),
        }
        return render(request, "login.html", context, status_code=400)
    await limits.login_succeeded(username)
    response = RedirectResponse(_safe_next(next) or HOME_BY_ROLE[user.role], status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        make_session_cookie(user, request.app.state.settings),
        httponly=True,
        samesite="lax",
        max_age=request.app.state.settings.session_max_age_seconds,
        secure=request.app.state.settings.environment == "production",
    )
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request, principal: AnyUser, db: DbSession) -> RedirectResponse:
    # Bumping the generation invalidates every cookie issued to this user, not only this browser's.
    db.execute(
        update(User).where(User.id == principal.id).values(session_generation=User.session_generation + 1)
    )
    db.commit()
    principal_cache(request).forget_user(principal.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
