"""Synthetic preference data made through the real services (tasks pool, assignment, submission).

`seed_marker_preferences` builds a separable preference: of two responses to each prompt, the one
containing the marker word always wins. A reward model must learn it; a round can train on it.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.assignment import assign_next_task
from app.models import Prompt, Response, TaskResponse, User
from app.schemas import AnnotationIn
from app.security import hash_password
from app.tasks_pool import add_static_tasks

MARKER = "sunshine"
TOPICS = [
    "tea",
    "rivers",
    "bicycles",
    "maps",
    "bread",
    "owls",
    "chess",
    "rain",
    "clocks",
    "kites",
    "salt",
    "stars",
    "boats",
    "honey",
    "trains",
    "moss",
    "paper",
    "glass",
    "wool",
    "bells",
]


def annotator(db: Session, username: str = "seed-annotator") -> User:
    user = db.query(User).filter_by(username=username).one_or_none()
    if user is None:
        user = User(username=username, role="annotator", password_hash=hash_password("seed-password-1"))
        db.add(user)
        db.commit()
    return user


def seed_marker_preferences(
    db: Session, n_prompts: int = 16, policy_id: int | None = None, eval_prompts: int = 4
) -> int:
    """Rank tasks whose marker response is ranked first by an annotator; returns the comparison count.
    Also adds `eval_prompts` held-out prompts (split 'eval') for the evaluation gate."""
    from app.annotations import submit_annotation

    items = []
    for i in range(n_prompts):
        topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" {i}")
        items.append(
            (
                f"Tell me something about {topic}.",
                [f"{topic.capitalize()} bring {MARKER} and joy.", f"{topic.capitalize()} are a topic."],
            )
        )
    task_ids = add_static_tasks(db, items, policy_id=policy_id, prompt_set="marker-preferences")
    user = annotator(db)
    made = 0
    for _ in task_ids:
        task_id = assign_next_task(db, user.id, ttl_seconds=600)
        shown = db.query(TaskResponse).filter_by(task_id=task_id).order_by(TaskResponse.position).all()
        texts = {tr.response_id: db.get(Response, tr.response_id).text for tr in shown}
        ranking = sorted(texts, key=lambda rid: MARKER not in texts[rid])
        result, _ = submit_annotation(db, task_id, user.id, AnnotationIn(ranking=[[r] for r in ranking]))
        made += result.comparisons
    first_set = db.query(Prompt).filter_by(text=items[0][0]).one().prompt_set_id
    for j in range(eval_prompts):
        text = f"Write one line about {TOPICS[-1 - j]} at dusk."
        db.add(
            Prompt(
                prompt_set_id=first_set,
                content_hash=f"eval-{j}-{text}"[:64],
                messages=[{"role": "user", "content": text}],
                text=text,
                split="eval",
            )
        )
    db.commit()
    return made
