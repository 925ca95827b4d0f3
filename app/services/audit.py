"""The audit log of account management: who did what to which account, and when.

Rows are only ever added, in the same transaction as the change they describe, so a change without
its record (or a record without its change) cannot be committed.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import AuditEntry, User

ACTIONS = (
    "user_created",
    "deactivated",
    "reactivated",
    "role_changed",
    "password_reset",
    "token_issued",
    "token_revoked",
)


@dataclass(frozen=True)
class Actor:
    """Who acts: an admin signed in to the web app (with their user id), or the command line."""

    id: int | None
    name: str

    @classmethod
    def command_line(cls) -> Actor:
        try:
            who = getpass.getuser()
        except Exception:  # no login name (some containers): still say it was the CLI
            who = "unknown"
        return cls(None, f"cli:{who}")


def record(db: Session, actor: Actor, action: str, target: User, **detail: Any) -> AuditEntry:
    """Add an entry (flushed; committed with the change it describes)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    entry = AuditEntry(
        actor_id=actor.id,
        actor=actor.name[:100],
        action=action,
        target_user_id=target.id,
        target=target.username,
        detail=detail,
    )
    db.add(entry)
    db.flush()
    return entry


def recent_entries(
    db: Session, limit: int = 200, target_user_id: int | None = None, before_id: int | None = None
) -> list[AuditEntry]:
    """Newest first; `before_id` pages back, `target_user_id` keeps one account's history."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target_user_id is not None:
        query = query.where(AuditEntry.target_user_id == target_user_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(db.scalars(query))
