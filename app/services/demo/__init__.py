"""Demo data for a first look: three logins and the demo prompt set (development only)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import PromptSet, User
from app.services.accounts import create_user, user_named
from app.services.prompt_sets import create_prompt_set

# username, role, password — printed by `prefloop serve` in development mode.
DEMO_USERS = [
    ("admin", "admin", "admin-demo"),
    ("annotator", "annotator", "annotator-demo"),
    ("researcher", "researcher", "researcher-demo"),
]
# The API clients of `prefloop demo-loop` (annotator, admin); their names are public too.
DEMO_BOT_USERS = [("demo-bot", "annotator"), ("demo-admin-bot", "admin")]
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


def active_demo_accounts(db: Session) -> list[str]:
    """Names of the demo and demo-loop accounts that can still log in or use a token."""
    names = [username for username, _role, _password in DEMO_USERS] + [name for name, _role in DEMO_BOT_USERS]
    return list(
        db.scalars(
            select(User.username)
            .where(User.username.in_(names), User.is_active.is_(True))
            .order_by(User.username)
        )
    )


def demo_accounts_refusal(names: list[str]) -> str:
    """Why production will not start while these demo accounts are active, and how to end them."""
    commands = "; ".join(f"prefloop users deactivate {name}" for name in names)
    return (
        f"refusing to start in production: demo accounts with public names and guessable passwords "
        f"are active: {', '.join(names)}. Deactivate them first: {commands}"
    )


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
        "reasoning, and requests a model should refuse. The rows marked split 'eval' (over a hundred, "
        "with a tenth of the rest) are held out for the promotion gate and the efficacy benchmark.",
        eval_fraction=0.1,
        split_seed=0,
    )
    return f"demo prompt set: {report.created} prompts ({report.train} train / {report.eval} eval)"
