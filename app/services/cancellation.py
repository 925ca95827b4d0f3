"""Cancelling a round or a run on an admin's request, saying why when there is nothing to cancel."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.data.models import Round, Run
from app.services.rounds import cancel_round
from app.services.runs import request_cancel


class CancelRefused(Exception):
    """There is nothing to cancel: the round or run does not exist (`missing`) or has already ended."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def cancel_round_on_request(db: Session, round_id: int) -> Round:
    """Cancel a round that has not ended (and ask its running run to stop); the round, refreshed."""
    round_ = db.get(Round, round_id)
    if round_ is None:
        raise CancelRefused(f"There is no round {round_id}.", missing=True)
    if not cancel_round(db, round_id):
        raise CancelRefused(
            f"Round {round_id} already ended ({round_.status}); there is nothing to cancel.", missing=False
        )
    db.refresh(round_)
    return round_


def cancel_run_on_request(db: Session, run_id: int) -> Run:
    """Cancel a queued run at once, or ask a running one to stop at its next check; the run."""
    run = db.get(Run, run_id)
    if run is None:
        raise CancelRefused(f"There is no run {run_id}.", missing=True)
    if not request_cancel(db, run_id):
        raise CancelRefused(
            f"Run {run_id} already ended ({run.status}); there is nothing to cancel.", missing=False
        )
    return run
