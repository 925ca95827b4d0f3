"""User accounts: creating users, checking passwords at login, and API tokens (both stored hashed).

Changing accounts as an admin (roles, deactivation, resets, revoking tokens, with an audit record)
is app.services.user_admin; this module holds what logging in and calling the API need."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import get_settings
from app.data.models import ApiToken, User

TOKEN_PREFIX = "pfl_"
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
MIN_PASSWORD_LENGTH = 8

_hasher = PasswordHasher()
# Verifying against a fixed hash when the user does not exist keeps login timing uniform.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class AccountError(ValueError):
    """A user cannot be created or changed as asked (the name is taken, or there is no such user)."""


class TokenExpired(AccountError):
    """A live token past its expiry: refused, with a message that says when and what to do."""

    def __init__(self, token: ApiToken):
        expired = _as_utc(token.expires_at)
        super().__init__(
            f"API token {token.name!r} ({token.prefix}…) expired on {expired:%Y-%m-%d %H:%M} UTC; "
            f"ask an admin for a new one (`prefloop users token {token.user.username}`)."
        )


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
    """Stop a user from logging in or using their tokens (the caller commits); raises if there is none.

    Their session cookies end too (a new generation), so reactivating the account later does not
    bring old sessions back."""
    user = user_named(db, username)
    if user is None:
        raise AccountError(f"no user {username!r}")
    if user.is_active:
        user.is_active = False
        user.session_generation += 1
    db.flush()
    return user


# ---------------------------------------------------------------- API tokens


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast hash is enough (unlike passwords).
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_token(db: Session, user: User, name: str, expires_in: timedelta | None = None) -> str:
    """Store a new token hashed and return the plain value (shown once). It expires after
    `expires_in` (default: PREFLOOP_API_TOKEN_DAYS days)."""
    return issue_api_token(db, user, name, expires_in)[0]


def issue_api_token(
    db: Session, user: User, name: str, expires_in: timedelta | None = None
) -> tuple[str, ApiToken]:
    """Like create_api_token, also returning the stored row (its id, prefix and expiry)."""
    if expires_in is None:
        expires_in = timedelta(days=get_settings().api_token_days)
    if expires_in <= timedelta(0):
        raise AccountError("a token's lifetime must be positive")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        user_id=user.id,
        name=name,
        prefix=token[:12],
        token_hash=hash_token(token),
        expires_at=datetime.now(UTC) + expires_in,
    )
    db.add(row)
    db.flush()
    return token, row


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:  # SQLite hands back naive UTC
        return moment.replace(tzinfo=UTC)
    return moment


def token_is_expired(token: ApiToken, now: datetime | None = None) -> bool:
    expires = _as_utc(token.expires_at)
    return expires is not None and (now or datetime.now(UTC)) >= expires


def user_for_token(db: Session, token: str) -> tuple[User, datetime | None] | None:
    """The active user a live (unrevoked) token belongs to and when the token expires, else None;
    notes when it was last used. Raises TokenExpired for a token past its expiry."""
    row = db.scalar(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    )
    if row is None or not row.user.is_active:
        return None
    now = datetime.now(UTC)
    if token_is_expired(row, now):
        raise TokenExpired(row)
    user, expires, last = row.user, _as_utc(row.expires_at), _as_utc(row.last_used_at)
    # "Last used" to the minute is enough; writing it on every request would cost a commit each.
    if last is None or now - last > TOKEN_TOUCH_INTERVAL:
        db.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        db.commit()
    return user, expires
