"""Account management without SQL: create, deactivate, reactivate, change role, reset password,
issue, list and revoke API tokens. The CLI (`prefloop users`) and the admin users page both call
these; each change adds its audit entry in the same transaction (the caller commits).

Web processes trust a verified login for PREFLOOP_AUTH_CACHE_SECONDS; the admin page drops the
changed user's cached logins in its own process at once, so elsewhere a change takes effect within
that window.

Guard rails: the last active admin can be neither deactivated nor demoted (nobody could undo it
without SQL), and an admin does not deactivate or demote themselves from the web (another admin,
or the CLI, does).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.data.models import ROLES, ApiToken, User
from app.services.accounts import (
    MIN_PASSWORD_LENGTH,
    AccountError,
    create_user,
    deactivate_user,
    hash_password,
    issue_api_token,
    user_named,
)
from app.services.audit import Actor, record

# About 120 bits, typed once by the user it is handed to.
GENERATED_PASSWORD_BYTES = 15


def user_or_error(db: Session, username: str) -> User:
    user = user_named(db, username)
    if user is None:
        raise AccountError(f"no user {username!r}; `prefloop users list` shows who exists")
    return user


def _active_admins(db: Session) -> int:
    return db.scalar(select(func.count(User.id)).where(User.role == "admin", User.is_active.is_(True))) or 0


def _keep_an_admin(db: Session, user: User, doing: str) -> None:
    if user.role == "admin" and user.is_active and _active_admins(db) <= 1:
        raise AccountError(
            f"{user.username} is the last active admin; make another user admin before you {doing} them"
        )


def _not_yourself(actor: Actor, user: User, doing: str) -> None:
    if actor.id is not None and actor.id == user.id:
        raise AccountError(f"you cannot {doing} your own account; ask another admin")


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


# ---------------------------------------------------------------- users


def create(
    db: Session, actor: Actor, username: str, role: str, password: str, email: str | None = None
) -> User:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    check_password(password)
    user = create_user(db, username, role, password, email=email)
    record(db, actor, "user_created", user, role=role)
    return user


def deactivate(db: Session, actor: Actor, username: str) -> User:
    """No more logins or API calls (sessions end; tokens stay but are refused while inactive)."""
    user = user_or_error(db, username)
    if not user.is_active:
        raise AccountError(f"{username} is already deactivated")
    _not_yourself(actor, user, "deactivate")
    _keep_an_admin(db, user, "deactivate")
    deactivate_user(db, username)
    record(db, actor, "deactivated", user)
    return user


def reactivate(db: Session, actor: Actor, username: str) -> User:
    """Logins and the user's unexpired, unrevoked tokens work again; old sessions stay ended."""
    user = user_or_error(db, username)
    if user.is_active:
        raise AccountError(f"{username} is already active")
    user.is_active = True
    db.flush()
    record(db, actor, "reactivated", user)
    return user


def change_role(db: Session, actor: Actor, username: str, role: str) -> User:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    user = user_or_error(db, username)
    if user.role == role:
        raise AccountError(f"{username} is {role} already")
    if role != "admin":
        _not_yourself(actor, user, "demote")
        _keep_an_admin(db, user, "demote")
    previous, user.role = user.role, role
    db.flush()
    record(db, actor, "role_changed", user, **{"from": previous, "to": role})
    return user


def reset_password(db: Session, actor: Actor, username: str, password: str | None = None) -> tuple[User, str]:
    """Set a new password (a generated one when None, returned to hand over once) and end every
    session of the user; their API tokens are untouched (revoke those separately)."""
    user = user_or_error(db, username)
    generated = password is None
    password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES) if password is None else password
    check_password(password)
    user.password_hash = hash_password(password)
    user.session_generation += 1
    db.flush()
    record(db, actor, "password_reset", user, generated=generated)
    return user, password


@dataclass(frozen=True)
class UserRow:
    id: int
    username: str
    role: str
    active: bool
    live_tokens: int
    created_at: datetime | None


def list_users(db: Session) -> list[UserRow]:
    """Every user by name, with the number of tokens that still work (not revoked, not expired)."""
    now = datetime.now(UTC)
    live = and_(
        ApiToken.user_id == User.id,
        ApiToken.revoked_at.is_(None),
        or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
    )
    rows = db.execute(
        select(User.id, User.username, User.role, User.is_active, User.created_at, func.count(ApiToken.id))
        .outerjoin(ApiToken, live)
        .group_by(User.id)
        .order_by(User.username)
    ).all()
    return [
        UserRow(uid, name, role, bool(active), int(n), created)
        for uid, name, role, active, created, n in rows
    ]


# ---------------------------------------------------------------- API tokens


def issue_token(
    db: Session, actor: Actor, username: str, name: str, days: int | None = None
) -> tuple[str, ApiToken]:
    """A new token for the user, living `days` days (default PREFLOOP_API_TOKEN_DAYS); the plain
    value is returned once and stored only as a hash."""
    user = user_or_error(db, username)
    if days is not None and not 1 <= days <= 3650:
        raise AccountError("a token lives between 1 and 3650 days")
    token, row = issue_api_token(db, user, name, timedelta(days=days) if days is not None else None)
    record(
        db,
        actor,
        "token_issued",
        user,
        token_id=row.id,
        name=name,
        prefix=row.prefix,
        expires_at=row.expires_at.isoformat(),
    )
    return token, row


@dataclass(frozen=True)
class TokenInfo:
    id: int
    username: str
    name: str
    prefix: str
    created_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        """revoked, expired or live (a token with no expiry predates expiring tokens)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and datetime.now(UTC) >= self.expires_at:
            return "expired"
        return "live"


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def list_tokens(db: Session, username: str | None = None, include_revoked: bool = False) -> list[TokenInfo]:
    """API tokens (never their values), newest first; one user's when `username` is given."""
    query = (
        select(ApiToken, User.username).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id.desc())
    )
    if username is not None:
        query = query.where(User.id == user_or_error(db, username).id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return [
        TokenInfo(
            t.id,
            name,
            t.name,
            t.prefix,
            _utc(t.created_at),
            _utc(t.last_used_at),
            _utc(t.expires_at),
            _utc(t.revoked_at),
        )
        for t, name in db.execute(query).all()
    ]


def revoke_token(db: Session, actor: Actor, token_id: int) -> ApiToken:
    token = db.get(ApiToken, token_id)
    if token is None:
        raise AccountError(f"no API token {token_id}; `prefloop users tokens` lists them")
    if token.revoked_at is not None:
        raise AccountError(f"API token {token_id} is revoked already")
    token.revoked_at = datetime.now(UTC)
    db.flush()
    record(db, actor, "token_revoked", token.user, token_id=token.id, name=token.name, prefix=token.prefix)
    return token
