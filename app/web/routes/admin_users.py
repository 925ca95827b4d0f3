"""Accounts in the admin console, and the audit log (admins only).

- `GET  /admin/users`                           users with their tokens and an action form for each
- `POST /admin/users/{id}/deactivate|reactivate|role|reset-password`
- `POST /admin/tokens/{id}/revoke`
- `GET  /admin/audit`, `GET /api/audit`         who did what to which account, and when

Each change goes through app.services.user_admin (the same functions as `prefloop users`), which
records it in the audit log in the same transaction. This process forgets the user's cached logins
at once; other web processes notice within PREFLOOP_AUTH_CACHE_SECONDS.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from app.data.models import ROLES, User
from app.services import user_admin
from app.services.accounts import AccountError
from app.services.audit import Actor, recent_entries
from app.web.deps import DbSession
from app.web.security import Admin, Principal, principal_cache
from app.web.templating import render

router = APIRouter(tags=["accounts"])


def _actor(principal: Principal) -> Actor:
    return Actor(principal.id, principal.username)


def _page(request: Request, db: Session, status_code: int = 200, **extra: Any):
    tokens: dict[str, list[user_admin.TokenInfo]] = {}
    for token in user_admin.list_tokens(db):
        tokens.setdefault(token.username, []).append(token)
    context = {
        "users": user_admin.list_users(db),
        "tokens": tokens,
        "roles": ROLES,
        "cache_seconds": request.app.state.settings.auth_cache_seconds,
        "message": None,
        "error": None,
        "new_password": None,
        **extra,
    }
    return render(request, "admin/users.html", context, status_code=status_code)


def _user(db: Session, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"There is no user {user_id}.")
    return user


def _apply(request: Request, db: Session, user_id: int, change: Callable[[User], str]):
    """Run one change; commit it with its audit entry, drop the user's cached logins, show the page."""
    try:
        message = change(_user(db, user_id))
        db.commit()
    except AccountError as exc:
        db.rollback()
        return _page(request, db, status.HTTP_409_CONFLICT, error=str(exc))
    principal_cache(request).forget_user(user_id)
    return _page(request, db, message=message)


@router.get("/admin/users", summary="Users and their API tokens", include_in_schema=False)
def users_page(request: Request, principal: Admin, db: DbSession):
    return _page(request, db)


@router.post("/admin/users/{user_id:int}/deactivate", include_in_schema=False)
def deactivate(user_id: int, request: Request, principal: Admin, db: DbSession):
    def change(user: User) -> str:
        user_admin.deactivate(db, _actor(principal), user.username)
        return f"Deactivated {user.username}: their sessions ended and their tokens are refused."

    return _apply(request, db, user_id, change)


@router.post("/admin/users/{user_id:int}/reactivate", include_in_schema=False)
def reactivate(user_id: int, request: Request, principal: Admin, db: DbSession):
    def change(user: User) -> str:
        user_admin.reactivate(db, _actor(principal), user.username)
        return f"Reactivated {user.username}."

    return _apply(request, db, user_id, change)


@router.post("/admin/users/{user_id:int}/role", include_in_schema=False)
def change_role(
    user_id: int, request: Request, principal: Admin, db: DbSession, role: Annotated[str, Form()]
):
    def change(user: User) -> str:
        previous = user.role
        user_admin.change_role(db, _actor(principal), user.username, role)
        return f"{user.username} is now {role} (was {previous})."

    return _apply(request, db, user_id, change)


@router.post("/admin/users/{user_id:int}/reset-password", include_in_schema=False)
def reset_password(user_id: int, request: Request, principal: Admin, db: DbSession):
    """A generated password, shown once on this page for the admin to hand over."""
    user = _user(db, user_id)
    try:
        _changed, password = user_admin.reset_password(db, _actor(principal), user.username)
        db.commit()
    except AccountError as exc:
        db.rollback()
        return _page(request, db, status.HTTP_409_CONFLICT, error=str(exc))
    principal_cache(request).forget_user(user_id)
    message = f"New password for {user.username} (shown once; their sessions have ended):"
    page = _page(request, db, message=message, new_password=password)
    page.headers["Cache-Control"] = "no-store"  # a password must not stay in a browser's cache
    return page


@router.post("/admin/tokens/{token_id:int}/revoke", include_in_schema=False)
def revoke_token(token_id: int, request: Request, principal: Admin, db: DbSession):
    try:
        token = user_admin.revoke_token(db, _actor(principal), token_id)
        owner_id, owner, name = token.user_id, token.user.username, token.name
        db.commit()
    except AccountError as exc:
        db.rollback()
        return _page(request, db, status.HTTP_409_CONFLICT, error=str(exc))
    principal_cache(request).forget_user(owner_id)
    return _page(request, db, message=f"Revoked {owner}'s token {name!r} (#{token_id}).")


# ---------------------------------------------------------------- audit log


class AuditEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    actor: str
    actor_id: int | None
    action: str
    target: str
    target_user_id: int | None
    detail: dict[str, Any]


def _entries(db: Session, limit: int, username: str | None, before_id: int | None):
    target = None
    if username is not None:
        try:
            target = user_admin.user_or_error(db, username).id
        except AccountError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return recent_entries(db, limit=limit, target_user_id=target, before_id=before_id)


AuditLimit = Annotated[int, Query(ge=1, le=1000, description="At most this many entries.")]
# Bounded like the columns they are compared with, so odd input is a 422 and never a database error.
AuditUser = Annotated[
    str | None,
    Query(max_length=64, pattern=r"^[^\x00-\x1f]*$", description="Only entries about this username."),
]
AuditBefore = Annotated[
    int | None, Query(ge=1, le=2**31 - 1, description="Entries older than this id (paging).")
]


@router.get(
    "/api/audit",
    summary="The audit log of account changes, newest first",
    description="Who deactivated, reactivated, changed the role or password of which user, and who "
    "issued or revoked which API token, with when. Admins only.",
    responses={404: {"description": "No user has the name given in `user`."}},
)
def audit_api(
    principal: Admin,
    db: DbSession,
    limit: AuditLimit = 200,
    user: AuditUser = None,
    before_id: AuditBefore = None,
) -> list[AuditEntryOut]:
    return [AuditEntryOut.model_validate(e) for e in _entries(db, limit, user, before_id)]


@router.get("/admin/audit", summary="Audit log page", include_in_schema=False)
def audit_page(
    request: Request,
    principal: Admin,
    db: DbSession,
    limit: AuditLimit = 200,
    user: AuditUser = None,
    before_id: AuditBefore = None,
):
    entries = _entries(db, limit, user, before_id)
    context = {
        "entries": entries,
        "user": user,
        "limit": limit,
        "older": entries[-1].id if len(entries) == limit else None,
    }
    return render(request, "admin/audit.html", context)
