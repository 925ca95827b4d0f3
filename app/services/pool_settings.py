"""Settings of the task pool an admin changes from the console, stored in app_settings.

The task overlap (how many annotators judge each new task) starts from PREFLOOP_TASK_OVERLAP; a
value saved from the console replaces it until it is reset. Tasks already made keep their overlap.
The automatic refill draws from every prompt set but those an admin paused.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import AppSetting, utcnow

TASK_OVERLAP_KEY = "task_overlap"
MAX_TASK_OVERLAP = 20


class PoolSettingError(ValueError):
    """A value the pool cannot use; the message says what to enter instead."""


def task_overlap(db: Session, settings: Settings) -> int:
    """Annotators per new task: the value saved from the console, else PREFLOOP_TASK_OVERLAP."""
    row = db.get(AppSetting, TASK_OVERLAP_KEY)
    if row is not None and row.value.strip().isdigit():
        return int(row.value)
    return settings.task_overlap


def saved_task_overlap(db: Session) -> int | None:
    """The overlap saved from the console, or None while the environment's default applies."""
    row = db.get(AppSetting, TASK_OVERLAP_KEY)
    return int(row.value) if row is not None and row.value.strip().isdigit() else None


def save_task_overlap(db: Session, value: int | None) -> None:
    """Store the overlap for new tasks (None: back to PREFLOOP_TASK_OVERLAP) and commit."""
    if value is not None and not 1 <= value <= MAX_TASK_OVERLAP:
        raise PoolSettingError(f"Annotators per task must be a whole number from 1 to {MAX_TASK_OVERLAP}.")
    row = db.get(AppSetting, TASK_OVERLAP_KEY)
    if value is None:
        if row is not None:
            db.delete(row)
    elif row is None:
        db.add(AppSetting(key=TASK_OVERLAP_KEY, value=str(value), updated_at=utcnow()))
    else:
        row.value = str(value)
        row.updated_at = utcnow()
    db.commit()


# ---------------------------------------------------------------- prompt sets the refill draws from

PAUSED_SETS_KEY = "refill_paused_prompt_sets"


def paused_prompt_sets(db: Session) -> set[int]:
    """Prompt sets the automatic refill leaves alone (an admin paused them); new sets take part."""
    row = db.get(AppSetting, PAUSED_SETS_KEY)
    if row is None or not row.value.strip():
        return set()
    try:
        return {int(i) for i in json.loads(row.value)}
    except (ValueError, TypeError):
        return set()


def set_prompt_set_in_refill(db: Session, prompt_set_id: int, included: bool) -> None:
    """Let the automatic refill draw from this prompt set again, or pause it; commits."""
    paused = paused_prompt_sets(db)
    paused = paused - {prompt_set_id} if included else paused | {prompt_set_id}
    value = json.dumps(sorted(paused))
    row = db.get(AppSetting, PAUSED_SETS_KEY)
    if row is None:
        db.add(AppSetting(key=PAUSED_SETS_KEY, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()
    db.commit()
