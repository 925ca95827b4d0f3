"""Demo data for a first look: three logins and the demo prompt set (development only)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import User
from app.prompt_sets import install_demo_prompt_set
from app.security import hash_password

# username, role, password — printed by `prefloop serve` in development mode.
DEMO_USERS = [
    ("admin", "admin", "admin-demo"),
    ("annotator", "annotator", "annotator-demo"),
    ("researcher", "researcher", "researcher-demo"),
]


def install_demo(db: Session, settings: Settings) -> str:
    """Create the demo users (and prompts, where available); safe to run twice."""
    if settings.environment == "production":
        raise RuntimeError("demo users have known passwords; they are refused in production")
    created = []
    for username, role, password in DEMO_USERS:
        if db.scalar(select(User).where(User.username == username)) is None:
            db.add(User(username=username, role=role, password_hash=hash_password(password)))
            created.append(username)
    db.flush()
    lines = [f"demo users: {', '.join(created) if created else 'already present'}"]
    lines.extend(_install_demo_prompts(db))
    return "\n".join(lines)


def _install_demo_prompts(db: Session) -> list[str]:
    return [install_demo_prompt_set(db)]
