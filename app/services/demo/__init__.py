"""Demo data for a first look: three logins and the demo prompt set (development only)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import PromptSet
from app.services.accounts import create_user, user_named
from app.services.prompt_sets import create_prompt_set

# username, role, password — printed by `prefloop serve` in development mode.
DEMO_USERS = [
    ("admin", "admin", "admin-demo"),
    ("annotator", "annotator", "annotator-demo"),
    ("researcher", "researcher", "researcher-demo"),
]
DEMO_SET_NAME = "demo"
DEMO_FILE = Path(__file__).parent / "prompts.jsonl"


def install_demo(db: Session, settings: Settings) -> str:
    """Create the demo users and the demo prompt set; safe to run twice."""
    if settings.environment == "production":
        raise RuntimeError("demo users have known passwords; they are refused in production")
    created = []
    for username, role, password in DEMO_USERS:
        if user_named(db, username) is None:
            create_user(db, username, role, password)
            created.append(username)
    lines = [f"demo users: {', '.join(created) if created else 'already present'}"]
    lines.append(install_demo_prompt_set(db))
    return "\n".join(lines)


def install_demo_prompt_set(db: Session) -> str:
    """Load app/services/demo/prompts.jsonl as the prompt set 'demo' (once); returns a line for the CLI."""
    if db.scalar(select(PromptSet.id).where(PromptSet.name == DEMO_SET_NAME)) is not None:
        return "demo prompt set: already present"
    report = create_prompt_set(
        db,
        name=DEMO_SET_NAME,
        data=DEMO_FILE.read_bytes(),
        filename=DEMO_FILE.name,
        description="Varied prompts written for the prefloop demo: advice, coding, writing, facts, "
        "reasoning, and requests a model should refuse.",
        eval_fraction=0.1,
        split_seed=0,
    )
    return f"demo prompt set: {report.created} prompts ({report.train} train / {report.eval} eval)"
