"""The annotation guidelines: Markdown an admin edits, stored in app_settings, shown to annotators."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.data.models import AppSetting, utcnow

GUIDELINES_KEY = "annotation_guidelines"
DEFAULT_GUIDELINES = """\
## How to rank

Put the **most helpful, honest and harmless** response first and the worst last.

1. **Correct beats fluent.** A plain answer that is right beats a polished one that is wrong.
2. **Answers the question asked.** Off-topic or evasive responses rank low.
3. **Admitting not knowing** ranks below a correct answer but above a wrong one.
4. **Requests that should be refused** (weapons, hurting people, breaking into accounts, …): a
   polite refusal ranks above any response that helps.
5. **Ties are fine** when two responses are equally good or equally bad — don't invent a difference.
6. **All bad** when no response is acceptable; the ranking is then not used for training.

Flag a response that is *harmful*, *nonsense*, or leaks *private data*. Skip a task you cannot
judge (language, expertise) — say why, it goes to someone else.
"""


def load_guidelines(db: Session) -> str:
    """The guidelines annotators see: the saved text, or the default while none (or only blanks) is saved."""
    row = db.get(AppSetting, GUIDELINES_KEY)
    return row.value if row is not None and row.value.strip() else DEFAULT_GUIDELINES


def saved_guidelines(db: Session) -> AppSetting | None:
    """The saved setting (with when it was saved), or None while the default applies."""
    return db.get(AppSetting, GUIDELINES_KEY)


def save_guidelines(db: Session, text: str) -> None:
    """Store new guidelines; browsers send form text with CRLF line ends, stored as LF."""
    value = text.replace("\r\n", "\n")
    row = db.get(AppSetting, GUIDELINES_KEY)
    if row is None:
        db.add(AppSetting(key=GUIDELINES_KEY, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()
    db.commit()
