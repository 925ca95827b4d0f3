"""Who may see, download and cancel which export run.

- **Admins**: every export run, in every state; they may cancel any of them.
- **The researcher who asked for an export**: their own, in every state (progress, errors), and
  they may cancel it while it is queued or running.
- **Other researchers**: finished (succeeded) exports only, to read, download and read the card
  of. Every researcher may export the same data themselves, so a finished dataset hides nothing
  from them; sharing it lets a team train on, cite and compare one file instead of re-exporting.
  Someone else's work in progress or failure is theirs: it is not listed, and asking for it by id
  answers as if it did not exist (404), so ids reveal nothing either. They may never cancel
  someone else's export.

An export run with no requester (its account was deleted) is, unfinished, the admins' alone.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, or_, true

from app.data.models import Run

SHARED_STATUS = "succeeded"


def visible_exports(user_id: int, role: str) -> ColumnElement[bool]:
    """The WHERE condition for the export runs this user may list and read."""
    if role == "admin":
        return true()
    return or_(Run.created_by == user_id, Run.status == SHARED_STATUS)


def may_see_export(run: Run, user_id: int, role: str) -> bool:
    return role == "admin" or run.created_by == user_id or run.status == SHARED_STATUS


def may_cancel_export(run: Run, user_id: int, role: str) -> bool:
    return role == "admin" or run.created_by == user_id
