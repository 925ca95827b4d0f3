"""Login form, logout, and the landing page that sends each role where it works."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import update

from app.data.models import User
from app.services.accounts import authenticate
from app.web.deps import DbSession
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


@router.post("/login", dependencies=[Depends(public), Depends(check_csrf)], include_in_schema=False)
def login(
    request: Request,
    db: DbSession,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "",
):
    user = authenticate(db, username.strip(), password)
    if user is None:
        # The username stays in the form: a mistyped password should not cost retyping both.
        context = {
            "next": _safe_next(next) or "",
            "error": "Unknown user or wrong password.",
            "username": username.strip(),
        }
        return render(request, "login.html", context, status_code=400)
    response = RedirectResponse(_safe_next(next) or HOME_BY_ROLE[user.role], status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        make_session_cookie(user),
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
