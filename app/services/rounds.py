"""Rounds: start one (at most one at a time) from a RoundSpec, cancel it, finish it.

A round chains runs — reward model → policy (PPO-max or DPO) → evaluation → register → promote
(automatic when the gate passes, else an admin decides, see app.services.promotion) → refill the
task pool with the new policy. The chain itself executes in a worker (workers/runs/rounds.py); this
module is what the web side, the CLI and beat call.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import get_settings
from app.data.models import Comparison, Policy, Round, Run, utcnow
from app.services import dispatch
from app.services.prompt_sets import reference_answers
from app.services.registry import live_policy
from app.services.retention import LowDiskSpace, ensure_free_disk
from app.services.round_spec import RoundSpec
from app.services.runs import request_cancel
from app.services.tasks_pool import close_open_arena_tasks

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("queued", "running")


class RoundConflict(Exception):
    def __init__(self, round_id: int):
        super().__init__(f"round {round_id} is still running; wait for it or cancel it first")
        self.round_id = round_id


class RoundError(ValueError):
    """A round cannot start as asked; the message says what to change."""


def active_round(db: Session) -> Round | None:
    return db.scalar(select(Round).where(Round.active.is_(True)))


def start_round(
    db: Session,
    spec: RoundSpec,
    *,
    started_by: int | None = None,
    trigger: str = "manual",
    enqueue: bool = True,
) -> Round:
    """Create the round row with its spec (the unique `active` flag refuses a second round) and
    enqueue its chain."""
    existing = active_round(db)
    if existing is not None:
        raise RoundConflict(existing.id)
    try:
        ensure_free_disk(get_settings())
    except LowDiskSpace as exc:
        raise RoundError(f"the round was not started: {exc}") from None
    live = live_policy(db)
    if live is None:
        raise RoundError("no live policy: run `prefloop init` first")
    snapshot = db.scalar(select(func.max(Comparison.id))) or 0
    if snapshot == 0:
        raise RoundError("no comparisons yet: annotators must rank some tasks before a round can train")
    ptx_coef = getattr(spec.root.policy, "ptx_coef", 0.0)
    if ptx_coef > 0 and not reference_answers(db):
        raise RoundError(
            f"policy.ptx_coef is {ptx_coef} but no train prompt carries a reference answer: upload a "
            "prompt set with a 'reference' column, or set policy.ptx_coef to 0"
        )
    round_ = Round(
        algorithm=spec.algorithm,
        config=spec.to_json(),
        active=True,
        status="queued",
        stage="queued",
        started_by=started_by,
        trigger=trigger,
        base_policy_id=live.id,
        comparison_snapshot=snapshot,
    )
    db.add(round_)
    try:
        db.commit()
    except IntegrityError:  # another request won the race for the one active slot
        db.rollback()
        winner = active_round(db)
        raise RoundConflict(winner.id if winner else -1) from None
    if enqueue:
        try:
            dispatch.enqueue(dispatch.RUN_ROUND, round_.id)
        except dispatch.NoSender:
            raise
        except Exception as exc:
            # The broker is unreachable (Redis down or restarting). The round is stored as queued,
            # and maintenance sends queued rounds again (PREFLOOP_QUEUED_RESEND_SECONDS): it waits
            # for the broker instead of failing the request after the row was written.
            log.warning("round %s is queued, but its task could not be sent yet (%s)", round_.id, exc)
    return round_


def cancel_round(db: Session, round_id: int) -> bool:
    """Cancel a queued or running round and ask its running run to stop."""
    round_ = db.get(Round, round_id)
    if round_ is None or round_.status not in (*ACTIVE_STATUSES, "awaiting_votes", "awaiting_approval"):
        return False
    for run_id in db.scalars(
        select(Run.id).where(Run.round_id == round_id, Run.status.in_(("queued", "running")))
    ):
        request_cancel(db, run_id)
    if round_.status == "awaiting_votes":  # its candidate's arena tasks stop being handed out
        for policy_id in db.scalars(select(Policy.id).where(Policy.round_id == round_id)):
            close_open_arena_tasks(db, policy_id)
    finish_round(db, round_, "cancelled", error="cancelled by an admin")
    return True


def finish_round(db: Session, round_: Round, status: str, error: str = "") -> None:
    round_.status = status
    round_.stage = status
    round_.active = None  # frees the one-active-round slot
    round_.error = error
    round_.finished_at = utcnow()
    db.commit()


def resend_queued_rounds(db: Session, older_than: timedelta) -> list[int]:
    """Send again the task of each round still queued `older_than` after it was last sent (a send
    that failed after the row committed). The round's task moves it to running and its runs claim
    their rows, so a duplicate message does nothing twice."""
    cutoff = utcnow() - older_than
    due = db.scalars(
        select(Round)
        .where(Round.status == "queued", func.coalesce(Round.sent_at, Round.created_at) < cutoff)
        .order_by(Round.id)
    ).all()
    resent = []
    for round_ in due:
        round_.sent_at = utcnow()
        db.commit()
        dispatch.enqueue(dispatch.RUN_ROUND, round_.id)
        resent.append(round_.id)
    return resent


def comparisons_since_last_round(db: Session) -> int:
    last_snapshot = (
        db.scalar(select(func.max(Round.comparison_snapshot)).where(Round.status != "cancelled")) or 0
    )
    return db.scalar(select(func.count(Comparison.id)).where(Comparison.id > last_snapshot)) or 0


def maybe_start_auto_round(db: Session, min_comparisons: int) -> Round | None:
    """Beat: start a round when enough new comparisons arrived since the last one (0 = off)."""
    if min_comparisons <= 0 or active_round(db) is not None:
        return None
    if comparisons_since_last_round(db) < min_comparisons:
        return None
    try:
        return start_round(db, RoundSpec.model_validate({}), trigger="auto")
    except (RoundConflict, RoundError) as exc:
        log.info("auto round not started: %s", exc)
        return None
