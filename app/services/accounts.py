"""User accounts: creating users, checking passwords at login, and API tokens (both stored hashed)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.data.models import ApiToken, User

TOKEN_PREFIX = "pfl_"
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
MIN_PASSWORD_LENGTH = 8

_hasher = PasswordHasher()
# Verifying against a fixed hash when the user does not exist keeps login timing uniform.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class AccountError(ValueError):
    """A user cannot be created or changed as asked (the name is taken, or there is no such user)."""


# ---------------------------------------------------------------- passwords and users


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def authenticate(db: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, else None (the same time either way)."""
    user = user_named(db, username)
    ok = verify_password(password, user.password_hash if user else None)
    return user if ok and user and user.is_active else None


def user_named(db: Session, username: str) -> User | None:
    return db.scalar(select(User).where(User.username == username))


def create_user(db: Session, username: str, role: str, password: str, email: str | None = None) -> User:
    """Add a user with an argon2-hashed password (flushed, so it has an id; the caller commits)."""
    if user_named(db, username) is not None:
        raise AccountError(f"user {username!r} exists already")
    user = User(username=username, role=role, email=email, password_hash=hash_password(password))
    db.add(user)
    db.flush()
    return user


def deactivate_user(db: Session, username: str) -> User:
    """Stop a user from logging in or using their tokens (the caller commits); raises if there is none."""
    user = user_named(db, username)
    if user is None:
        raise AccountError(f"no user {username!r}")
    user.is_active = False
    db.flush()
    return user


def users_with_token_counts(db: Session) -> list[tuple[str, str, bool, int]]:
    """(username, role, active, live API tokens) for every user, by name."""
    rows = db.execute(
        select(User.username, User.role, User.is_active, func.count(ApiToken.id))
        .outerjoin(ApiToken, (ApiToken.user_id == User.id) & ApiToken.revoked_at.is_(None))
        .group_by(User.id)
        .order_by(User.username)
    ).all()
    return [(username, role, bool(active), int(tokens)) for username, role, active, tokens in rows]


# ---------------------------------------------------------------- API tokens


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast hash is enough (unlike passwords).
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_token(db: Session, user: User, name: str) -> str:
    """Store a new token hashed and return the plain value (shown once)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db.add(ApiToken(user_id=user.id, name=name, prefix=token[:12], token_hash=hash_token(token)))
    db.flush()
    return token


def user_for_token(db: Session, token: str) -> User | None:
    """The active user a live (unrevoked) token belongs to, else None; notes when it was last used."""
    row = db.scalar(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    )
    if row is None or not row.user.is_active:
        return None
    now = datetime.now(UTC)
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite hands back naive UTC
        last = last.replace(tzinfo=UTC)
    # "Last used" to the minute is enough; writing it on every request would cost a commit each.
    if last is None or now - last > TOKEN_TOUCH_INTERVAL:
        db.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        db.commit()
    return row.user
