"""Submitting a judgement: validate it against the task, store it once, derive pairwise comparisons.

Rules (DESIGN.md §4):
- one annotation per (task, annotator); the same payload again returns the same result, a different
  one is refused with 409 (the payload hash decides; time spent is measurement, not judgement);
- a ranking names every response of the task exactly once; unknown, foreign and missing ids are
  refused with 422 and named;
- comparisons: every response in a better tie group beats every response in a worse one, with
  margin = the distance between the groups (adjacent groups 1, one group between them 2, …);
  responses in the same group (ties) give none; an all-bad judgement is kept and gives none;
- a skip stores the reason, gives the slot back to the pool and never counts towards the overlap.

Everything runs in one transaction that locks the task row first (the order assignment and expiry
use too), so counters and the annotation row commit together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from sqlalchemy import DateTime, bindparam, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import is_postgres, run_on_its_own
from app.hot_statements import HotStatements
from app.models import Annotation, Response, utcnow
from app.schemas import AnnotationIn, AnnotationResult


class AnnotationError(Exception):
    """A submission that cannot be accepted; `status` is the HTTP code, the message says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    margin: float


def normalise(payload: AnnotationIn) -> AnnotationIn:
    """Canonical form: ids sorted inside tie groups, flags sorted and deduplicated, texts stripped."""
    return payload.model_copy(
        update={
            "ranking": [sorted(group) for group in payload.ranking],
            "flags": {rid: sorted(set(names)) for rid, names in sorted(payload.flags.items()) if names},
            "skip_reason": payload.skip_reason.strip(),
            "flag_note": payload.flag_note.strip(),
            "rationale": payload.rationale.strip(),
        }
    )


def payload_hash(payload: AnnotationIn, normalised: bool = False) -> str:
    """The judgement's identity for replays: equal for payloads that mean the same (time spent aside).

    Pass normalised=True for a payload that already went through normalise().
    """
    p = payload if normalised else normalise(payload)
    body = {
        "ranking": p.ranking,
        "all_bad": p.all_bad,
        "skip": p.skip,
        "skip_reason": p.skip_reason,
        "flags": {str(k): v for k, v in p.flags.items()},
        "flag_note": p.flag_note,
        "rationale": p.rationale,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derive_comparisons(ranking: list[list[int]], all_bad: bool = False) -> list[Pair]:
    """Pairs (chosen beats rejected) from tie groups best→worst; margin is the group distance."""
    if all_bad:
        return []
    pairs = []
    for i, better in enumerate(ranking):
        for j in range(i + 1, len(ranking)):
            for chosen in better:
                for rejected in ranking[j]:
                    pairs.append(Pair(chosen=chosen, rejected=rejected, margin=float(j - i)))
    return pairs


def _check_ranking(db: Session, payload: AnnotationIn, shown: list[int]) -> None:
    """422 naming every unknown, foreign, repeated or missing response id."""
    task_ids = set(shown)
    problems = []
    named = [rid for group in payload.ranking for rid in group]
    repeated = sorted({rid for rid in named if named.count(rid) > 1})
    outside = sorted(set(named) - task_ids)
    flagged_outside = sorted(set(payload.flags) - task_ids - set(outside))
    outside_all = sorted(set(outside) | set(flagged_outside))
    if outside_all:
        existing = set(db.scalars(select(Response.id).where(Response.id.in_(outside_all))).all())
        foreign = [rid for rid in outside_all if rid in existing]
        unknown = [rid for rid in outside_all if rid not in existing]
        if unknown:
            problems.append(f"unknown response ids {unknown}")
        if foreign:
            problems.append(f"response ids {foreign} belong to another task")
    if repeated:
        problems.append(f"response ids {repeated} appear more than once")
    if payload.ranking:
        missing = sorted(task_ids - set(named))
        if missing:
            problems.append(f"missing response ids {missing}: rank every response of the task")
    if problems:
        raise AnnotationError(422, "; ".join(problems) + f" (this task's responses are {sorted(task_ids)})")


def _result(annotation_id: int, task_id: int, stored: AnnotationIn, unchanged: bool) -> AnnotationResult:
    return AnnotationResult(
        annotation_id=annotation_id,
        task_id=task_id,
        status="skipped" if stored.skip else "submitted",
        comparisons=0 if stored.skip else len(derive_comparisons(stored.ranking, stored.all_bad)),
        shown_order_unchanged=unchanged,
    )


def _existing(db: Session, task_id: int, user_id: int, digest: str) -> AnnotationResult | None:
    row = db.execute(
        select(
            Annotation.id,
            Annotation.payload_hash,
            Annotation.ranking,
            Annotation.all_bad,
            Annotation.skipped,
            Annotation.shown_order_unchanged,
        ).where(Annotation.task_id == task_id, Annotation.user_id == user_id)
    ).first()
    if row is None:
        return None
    if row.payload_hash != digest:
        raise AnnotationError(
            409,
            f"you already submitted a different judgement for task {task_id}; a submission cannot be changed",
        )
    comparisons = 0 if row.skipped else len(derive_comparisons(row.ranking, row.all_bad))
    return AnnotationResult(
        annotation_id=row.id,
        task_id=task_id,
        status="skipped" if row.skipped else "submitted",
        comparisons=comparisons,
        shown_order_unchanged=row.shown_order_unchanged,
    )


# ---------------------------------------------------------------- SQL of the hot path
#
# Hand-written statements, built once (submission is the busiest write of the system).
#
# Postgres: one call of prefloop_submit_annotation (migration 0005) locks the task row, reads the
# annotator's assignment after the lock, checks the ranking against the responses shown and writes
# everything, in one round trip; its `outcome` says which rule refused a judgement, and the messages
# are made here. SQLite (one writer at a time) runs the same steps as plain statements.

_SUBMIT_POSTGRES = text(
    """
SELECT outcome, shown, new_annotation_id, shown_order_unchanged
FROM prefloop_submit_annotation(
    :task_id, :user_id, :named, :flagged, :order, :skip, :all_bad, CAST(:ranking AS jsonb),
    :skip_reason, CAST(:flags AS jsonb), :rationale, :time_spent_ms, :payload_hash, :now,
    :chosen, :rejected, :margin)
"""
).bindparams(bindparam("now", type_=DateTime(timezone=True)))

# SQLite has no row locks: a no-op write takes the database's write lock, then one read sees it all.
_LOCK_SQLITE = text("UPDATE tasks SET claimed_count = claimed_count WHERE id = :task_id")
_STATE_SQLITE = text(
    """
SELECT t.prompt_id, a.id AS assignment_id, a.status AS assignment_status,
       (SELECT json_group_array(response_id) FROM
          (SELECT response_id FROM task_responses WHERE task_id = t.id ORDER BY position)) AS shown
FROM tasks t LEFT JOIN assignments a ON a.task_id = t.id AND a.user_id = :user_id
WHERE t.id = :task_id
"""
)

# Count the judgement (or give a skipped slot back). A judgement counts only while the task takes
# one: open, not yet complete, and — when the annotator's assignment expired — with a free slot.
_COUNT_SQLITE = text(
    """
UPDATE tasks SET
    annotation_count = annotation_count + :counts,
    claimed_count = claimed_count + :claim_delta,
    status = CASE WHEN annotation_count + :counts >= required_annotations THEN 'done' ELSE status END
WHERE id = :task_id AND (:skip OR (
    status = 'open' AND annotation_count < required_annotations
    AND claimed_count + :claim_delta <= required_annotations))
RETURNING id
"""
)
_ANNOTATION_SQLITE = text(
    "INSERT INTO annotations (task_id, user_id, ranking, all_bad, skipped, skip_reason, flags, rationale, "
    "time_spent_ms, shown_order_unchanged, payload_hash, created_at) "
    "VALUES (:task_id, :user_id, :ranking, :all_bad, :skip, :skip_reason, :flags, :rationale, "
    ":time_spent_ms, :unchanged, :payload_hash, :now) RETURNING id"
).bindparams(bindparam("now", type_=DateTime(timezone=True)))
_PAIRS_SQLITE = text(
    "INSERT INTO comparisons (annotation_id, prompt_id, chosen_response_id, rejected_response_id, margin, "
    "created_at) VALUES (:annotation_id, :prompt_id, :chosen, :rejected, :margin, :now)"
).bindparams(bindparam("now", type_=DateTime(timezone=True)))
_ASSIGNED_SQLITE = text("UPDATE assignments SET status = :assignment_status WHERE id = :assignment_id")


def submit_annotation(
    db: Session, task_id: int, user_id: int, payload: AnnotationIn
) -> tuple[AnnotationResult, bool]:
    """Store a judgement (committed). Returns (result, created); created is False for a replay.

    Raises AnnotationError (404, 409, 422) with a message that says what to fix.
    """
    judgement = _Judgement.of(task_id, user_id, payload)
    try:
        outcome = _write_postgres(db, judgement) if is_postgres(db) else _write_sqlite(db, judgement)
    except (IntegrityError, psycopg.IntegrityError):
        db.rollback()
        return _after_conflict(db, judgement)
    except BaseException:
        db.rollback()
        raise
    if outcome.status == "stored":
        db.commit()
        return _result(outcome.annotation_id, task_id, judgement.payload, outcome.unchanged), True
    db.rollback()  # nothing was written (SQLite: give up the write lock)
    return _settle(db, judgement, outcome)


async def submit_annotation_async(
    hot: HotStatements | None, db: Session, task_id: int, user_id: int, payload: AnnotationIn
) -> tuple[AnnotationResult, bool]:
    """submit_annotation for an async handler: with `hot` (Postgres) the storing call runs on the event
    loop, and a refused judgement is explained from the database in a worker thread with `db`;
    without it, all of submit_annotation runs in a worker thread."""
    if hot is None:
        return await anyio.to_thread.run_sync(submit_annotation, db, task_id, user_id, payload)
    judgement = _Judgement.of(task_id, user_id, payload)
    try:
        rows = await hot.rows(_SUBMIT_POSTGRES, judgement.postgres_params())
    except psycopg.IntegrityError:
        return await anyio.to_thread.run_sync(_after_conflict, db, judgement)
    outcome = _Outcome.of(rows[0])
    if outcome.status == "stored":
        return _result(outcome.annotation_id, task_id, judgement.payload, outcome.unchanged), True
    return await anyio.to_thread.run_sync(_settle, db, judgement, outcome)


def _after_conflict(db: Session, judgement: _Judgement) -> tuple[AnnotationResult, bool]:
    """A concurrent identical request (double click, client retry) stored the judgement first."""
    replay = _replay(db, judgement)
    if replay is None:
        raise AnnotationError(409, f"task {judgement.task_id} is being judged by another request of yours")
    return replay, False


def _settle(db: Session, judgement: _Judgement, outcome: _Outcome) -> tuple[AnnotationResult, bool]:
    """A judgement that was not stored: the stored result of a replay, or why it was refused."""
    task_id = judgement.task_id
    if outcome.status == "judged":
        replay = _replay(db, judgement)
        if replay is None:  # cannot happen: the assignment says it was judged
            raise AnnotationError(409, f"task {task_id} was already judged by you")
        return replay, False
    if outcome.status == "no_task":
        raise AnnotationError(404, f"there is no task {task_id}")
    if outcome.status == "invalid":
        _check_ranking(db, judgement.payload, outcome.shown)
        raise AnnotationError(422, f"rank every response of the task once: {sorted(outcome.shown)}")
    if outcome.status == "not_assigned":
        raise AnnotationError(
            409, f"task {task_id} is not assigned to you; fetch one with GET /api/tasks/next"
        )
    raise AnnotationError(
        409,
        f"task {task_id} no longer takes judgements (your assignment expired and the task was "
        "completed by others, or it was closed); fetch the next task",
    )


def _replay(db: Session, judgement: _Judgement) -> AnnotationResult | None:
    """The stored result of this annotator's judgement of the task (409 if it was a different one)."""
    try:
        return _existing(db, judgement.task_id, judgement.user_id, judgement.digest)
    finally:
        db.commit()  # only read: a commit keeps the connection's prepared statements (see read_session)


@dataclass(frozen=True)
class _Judgement:
    """A normalised judgement as the storing statements take it."""

    task_id: int
    user_id: int
    payload: AnnotationIn
    digest: str
    named: list[int]  # the ranking's response ids, best first
    flagged: list[int]
    no_ties: bool
    pairs: list[Pair]

    @classmethod
    def of(cls, task_id: int, user_id: int, payload: AnnotationIn) -> _Judgement:
        payload = normalise(payload)
        return cls(
            task_id=task_id,
            user_id=user_id,
            payload=payload,
            digest=payload_hash(payload, normalised=True),
            named=[rid for group in payload.ranking for rid in group],
            flagged=sorted(payload.flags),
            no_ties=all(len(group) == 1 for group in payload.ranking),
            pairs=[] if payload.skip else derive_comparisons(payload.ranking, payload.all_bad),
        )

    def fits(self, shown: list[int]) -> bool:
        """Every shown response ranked exactly once (or none, when allowed), flags on shown ones only."""
        named, task = set(self.named), set(shown)
        if not (named <= task and set(self.flagged) <= task):
            return False
        return not self.named or (len(self.named) == len(shown) and task <= named)

    def unchanged(self, shown: list[int]) -> bool:
        p = self.payload
        return not p.skip and not p.all_bad and self.no_ties and self.named == shown

    def params(self) -> dict[str, Any]:
        p = self.payload
        return {
            "task_id": self.task_id,
            "user_id": self.user_id,
            "skip": p.skip,
            "ranking": json.dumps(p.ranking),
            "all_bad": p.all_bad,
            "skip_reason": p.skip_reason,
            "flags": json.dumps(_flags_json(p)),
            "rationale": p.rationale,
            "time_spent_ms": p.time_spent_ms,
            "payload_hash": self.digest,
            "now": utcnow(),
        }

    def postgres_params(self) -> dict[str, Any]:
        """The arguments of prefloop_submit_annotation."""
        return {
            **self.params(),
            "named": self.named,
            "flagged": self.flagged,
            "order": self.named if self.no_ties else None,
            "chosen": [p.chosen for p in self.pairs],
            "rejected": [p.rejected for p in self.pairs],
            "margin": [p.margin for p in self.pairs],
        }


@dataclass(frozen=True)
class _Outcome:
    status: str  # stored | no_task | judged | invalid | not_assigned | closed
    shown: list[int] = field(default_factory=list)
    annotation_id: int | None = None
    unchanged: bool = False

    @classmethod
    def of(cls, row: Any) -> _Outcome:
        """From a row of prefloop_submit_annotation."""
        return cls(row.outcome, list(row.shown or []), row.new_annotation_id, bool(row.shown_order_unchanged))


def _write_postgres(db: Session, judgement: _Judgement) -> _Outcome:
    return _Outcome.of(run_on_its_own(db, _SUBMIT_POSTGRES, judgement.postgres_params())[0])


def _write_sqlite(db: Session, judgement: _Judgement) -> _Outcome:
    """The steps of prefloop_submit_annotation (migration 0005), under SQLite's database write lock."""
    conn = db.connection()
    key = {"task_id": judgement.task_id, "user_id": judgement.user_id}
    conn.execute(_LOCK_SQLITE, key)
    state = conn.execute(_STATE_SQLITE, key).first()
    if state is None:
        return _Outcome("no_task")
    shown = json.loads(state.shown or "[]")
    if state.assignment_status in ("submitted", "skipped"):
        return _Outcome("judged", shown)
    if not judgement.fits(shown):
        return _Outcome("invalid", shown)
    if state.assignment_id is None:
        return _Outcome("not_assigned", shown)
    # A skip gives a held slot back; a judgement on an expired assignment needs a free slot again.
    holds_slot = state.assignment_status == "active"
    skip = judgement.payload.skip
    counts, claim_delta = (0, -1 if holds_slot else 0) if skip else (1, 0 if holds_slot else 1)
    params = {**judgement.params(), "counts": counts, "claim_delta": claim_delta}
    if conn.execute(_COUNT_SQLITE, params).scalar() is None:
        return _Outcome("closed", shown)
    unchanged = judgement.unchanged(shown)
    annotation_id = conn.execute(_ANNOTATION_SQLITE, {**params, "unchanged": unchanged}).scalar_one()
    if judgement.pairs:
        rows = [
            {**params, "annotation_id": annotation_id, "prompt_id": state.prompt_id, "chosen": p.chosen,
             "rejected": p.rejected, "margin": p.margin}
            for p in judgement.pairs
        ]  # fmt: skip
        conn.execute(_PAIRS_SQLITE, rows)
    conn.execute(
        _ASSIGNED_SQLITE,
        {"assignment_id": state.assignment_id, "assignment_status": "skipped" if skip else "submitted"},
    )
    return _Outcome("stored", shown, annotation_id, unchanged)


def _flags_json(payload: AnnotationIn) -> dict:
    flags: dict = {"responses": {str(rid): names for rid, names in payload.flags.items()}}
    if payload.flag_note:
        flags["note"] = payload.flag_note
    return flags
