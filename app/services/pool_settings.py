"""Settings of the task pool an admin changes from the console, stored in app_settings.

The task overlap (how many annotators judge each new task) starts from PREFLOOP_TASK_OVERLAP; a
value saved from the console replaces it until it is reset. Tasks already made keep their overlap.
"""

from __future__ import annotations

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
