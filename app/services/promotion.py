"""Promote a policy version or roll back, and what follows when the live version changes.

The registry moves the live alias and publishes the wake-up for every server's policy holder. When
that changed the live version, a round that waited for an admin to approve this candidate is done,
and the task pool refills with the version now live. The API, the admin console, the CLI and a
round's own promotion all come through here, so they follow the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import Policy, Round
from app.services.registry import live_policy, rollback_target, set_live
from app.services.tasks_pool import request_refill

log = logging.getLogger(__name__)


@dataclass
class Promotion:
    """What a promote or a rollback did."""

    policy: Policy  # live now
    previous: Policy | None  # live before
    refill_run_id: int | None = None  # the generation run queued to refill the task pool
    refill_error: str = ""  # why no refill could be queued; the version is live all the same

    @property
    def changed(self) -> bool:
        return self.previous is None or self.previous.id != self.policy.id


def promote(db: Session, version: int, settings: Settings | None = None) -> Promotion:
    """Make a registered version live. When that changed the live version, a round awaiting approval
    of this candidate succeeds, and the pool refills with it, part of it arena tasks against the
    version it replaced. Raises RegistryError for a missing, rejected or vanished version."""
    previous = live_policy(db)
    promotion = Promotion(policy=set_live(db, version, settings), previous=previous)
    if promotion.changed:
        _finish_round_awaiting(db, promotion.policy)
        _refill(db, promotion, arena_against=promotion.previous, settings=settings)
    return promotion


def rollback(db: Session, settings: Settings | None = None) -> Promotion:
    """Put the previously live version back and refill the pool with it. No arena tasks against the
    version taken down: an admin rolls back to stop serving it. Raises RegistryError without one."""
    previous = live_policy(db)
    promotion = Promotion(policy=set_live(db, rollback_target(db).version, settings), previous=previous)
    if promotion.changed:
        _refill(db, promotion, arena_against=None, settings=settings)
    return promotion


def _finish_round_awaiting(db: Session, policy: Policy) -> None:
    round_ = db.get(Round, policy.round_id) if policy.round_id is not None else None
    if round_ is not None and round_.status == "awaiting_approval":
        round_.status = round_.stage = "succeeded"
        db.commit()


def _refill(
    db: Session, promotion: Promotion, arena_against: Policy | None, settings: Settings | None
) -> None:
    try:
        promotion.refill_run_id = request_refill(
            db,
            policy_version=promotion.policy.version,
            arena_against=arena_against.version if arena_against else None,
            settings=settings,
        )
    except Exception as exc:
        # The alias has moved and committed; a refill that could not be queued must not undo that,
        # and beat tops the pool up when it runs low.
        log.exception("refilling tasks for v%s failed", promotion.policy.version)
        db.rollback()
        promotion.refill_error = str(exc)
