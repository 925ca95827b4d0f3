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
from dataclasses import dataclass

from sqlalchemy import DateTime, bindparam, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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
# Hand-written statements, built once (submission is the busiest write of the system). Postgres
# reads the task under its row lock in one statement and writes everything in a second; SQLite
# (one writer at a time) uses plain statements.

# The task row is locked first (the order assignment and expiry use too); only then is the
# assignment read, in a statement of its own: a statement that waited for the lock would still see
# the assignment as it was before the wait (e.g. before the expiry job took it back).
_LOCK_POSTGRES = text(
    """
SELECT t.prompt_id,
       (SELECT array_agg(tr.response_id ORDER BY tr.position)
          FROM task_responses tr WHERE tr.task_id = t.id) AS shown
FROM tasks t WHERE t.id = :task_id
FOR UPDATE
"""
)
_ASSIGNMENT_POSTGRES = text(
    "SELECT id AS assignment_id, status AS assignment_status FROM assignments "
    "WHERE task_id = :task_id AND user_id = :user_id"
)
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


@dataclass(frozen=True)
class _State:
    prompt_id: int
    shown: list[int]
    assignment_id: int | None
    assignment_status: str | None


def _locked_state(conn, task_id: int, user_id: int) -> _State | None:
    """The task's shown responses and this annotator's assignment, read under the task's lock."""
    key = {"task_id": task_id, "user_id": user_id}
    if conn.dialect.name == "postgresql":
        task = conn.execute(_LOCK_POSTGRES, key).first()
        if task is None:
            return None
        assignment = conn.execute(_ASSIGNMENT_POSTGRES, key).first()
        return _State(
            task.prompt_id,
            list(task.shown or []),
            assignment.assignment_id if assignment else None,
            assignment.assignment_status if assignment else None,
        )
    conn.execute(_LOCK_SQLITE, key)
    row = conn.execute(_STATE_SQLITE, key).first()
    if row is None:
        return None
    return _State(row.prompt_id, json.loads(row.shown or "[]"), row.assignment_id, row.assignment_status)


# Count the judgement (or give a skipped slot back). A judgement counts only while the task takes
# one: open, not yet complete, and — when the annotator's assignment expired — with a free slot.
_COUNT = """
UPDATE tasks SET
    annotation_count = annotation_count + :counts,
    claimed_count = claimed_count + :claim_delta,
    status = CASE WHEN annotation_count + :counts >= required_annotations THEN 'done' ELSE status END
WHERE id = :task_id AND (:skip OR (
    status = 'open' AND annotation_count < required_annotations
    AND claimed_count + :claim_delta <= required_annotations))
RETURNING id
"""
_ANNOTATION_COLUMNS = (
    "task_id, user_id, ranking, all_bad, skipped, skip_reason, flags, rationale, time_spent_ms, "
    "shown_order_unchanged, payload_hash, created_at"
)
_ANNOTATION_VALUES = (
    ":task_id, :user_id, {ranking}, :all_bad, :skip, :skip_reason, {flags}, :rationale, :time_spent_ms, "
    ":unchanged, :payload_hash, :now"
)

# Postgres: the count, the annotation, its comparisons and the assignment in one statement.
_WRITE_POSTGRES = text(
    f"""
WITH counted AS ({_COUNT}),
annotation AS (
    INSERT INTO annotations ({_ANNOTATION_COLUMNS})
    SELECT {_ANNOTATION_VALUES.format(ranking="CAST(:ranking AS jsonb)", flags="CAST(:flags AS jsonb)")}
    FROM counted
    RETURNING id
),
pairs AS (
    INSERT INTO comparisons (annotation_id, prompt_id, chosen_response_id, rejected_response_id, margin, created_at)
    SELECT annotation.id, :prompt_id, p.chosen, p.rejected, p.margin, :now
    FROM annotation,
         unnest(CAST(:chosen AS integer[]), CAST(:rejected AS integer[]), CAST(:margin AS float8[]))
             AS p(chosen, rejected, margin)
),
assigned AS (
    UPDATE assignments SET status = :assignment_status
    WHERE id = :assignment_id AND EXISTS (SELECT 1 FROM annotation)
)
SELECT id FROM annotation
"""
).bindparams(bindparam("now", type_=DateTime(timezone=True)))

_COUNT_SQLITE = text(_COUNT)
_ANNOTATION_SQLITE = text(
    f"INSERT INTO annotations ({_ANNOTATION_COLUMNS}) "
    f"VALUES ({_ANNOTATION_VALUES.format(ranking=':ranking', flags=':flags')}) RETURNING id"
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
    payload = normalise(payload)
    digest = payload_hash(payload, normalised=True)
    try:
        result = _store(db, task_id, user_id, payload, digest)
    except _AlreadyJudged:
        db.rollback()
        replay = _existing(db, task_id, user_id, digest)
        db.rollback()
        if replay is None:  # cannot happen: the assignment says it was judged
            raise AnnotationError(409, f"task {task_id} was already judged by you") from None
        return replay, False
    except IntegrityError:
        # A concurrent identical request (double click, client retry) stored it first.
        db.rollback()
        replay = _existing(db, task_id, user_id, digest)
        db.rollback()
        if replay is None:
            raise
        return replay, False
    except BaseException:
        db.rollback()
        raise
    return result, True


class _AlreadyJudged(Exception):
    """This annotator's assignment is submitted or skipped: the request is a replay or a change."""


def _store(db: Session, task_id: int, user_id: int, payload: AnnotationIn, digest: str) -> AnnotationResult:
    conn = db.connection()
    postgres = conn.dialect.name == "postgresql"
    state = _locked_state(conn, task_id, user_id)
    if state is None:
        raise AnnotationError(404, f"there is no task {task_id}")
    if state.assignment_status in ("submitted", "skipped"):
        raise _AlreadyJudged()
    shown = state.shown
    _check_ranking(db, payload, shown)
    if state.assignment_id is None:
        raise AnnotationError(
            409, f"task {task_id} is not assigned to you; fetch one with GET /api/tasks/next"
        )
    holds_slot = state.assignment_status == "active"
    if payload.skip:
        counts, claim_delta = 0, -1 if holds_slot else 0  # the slot goes back to the pool
    else:
        counts, claim_delta = 1, 0 if holds_slot else 1  # expired: it needs a free slot again
    unchanged = (
        not payload.skip
        and not payload.all_bad
        and all(len(group) == 1 for group in payload.ranking)
        and [group[0] for group in payload.ranking] == shown
    )
    pairs = [] if payload.skip else derive_comparisons(payload.ranking, payload.all_bad)
    params = {
        "task_id": task_id,
        "user_id": user_id,
        "prompt_id": state.prompt_id,
        "assignment_id": state.assignment_id,
        "assignment_status": "skipped" if payload.skip else "submitted",
        "counts": counts,
        "claim_delta": claim_delta,
        "skip": payload.skip,
        "ranking": json.dumps(payload.ranking),
        "all_bad": payload.all_bad,
        "skip_reason": payload.skip_reason,
        "flags": json.dumps(_flags_json(payload)),
        "rationale": payload.rationale,
        "time_spent_ms": payload.time_spent_ms,
        "unchanged": unchanged,
        "payload_hash": digest,
        "now": utcnow(),
    }
    if postgres:
        params["chosen"] = [p.chosen for p in pairs]
        params["rejected"] = [p.rejected for p in pairs]
        params["margin"] = [p.margin for p in pairs]
        annotation_id = conn.execute(_WRITE_POSTGRES, params).scalar()
    else:
        annotation_id = None
        if conn.execute(_COUNT_SQLITE, params).scalar() is not None:
            annotation_id = conn.execute(_ANNOTATION_SQLITE, params).scalar_one()
            if pairs:
                rows = [
                    {**params, "annotation_id": annotation_id, "chosen": p.chosen, "rejected": p.rejected,
                     "margin": p.margin}
                    for p in pairs
                ]  # fmt: skip
                conn.execute(_PAIRS_SQLITE, rows)
            conn.execute(_ASSIGNED_SQLITE, params)
    if annotation_id is None:
        raise AnnotationError(
            409,
            f"task {task_id} no longer takes judgements (your assignment expired and the task was "
            "completed by others, or it was closed); fetch the next task",
        )
    db.commit()
    return _result(annotation_id, task_id, payload, unchanged)


def _flags_json(payload: AnnotationIn) -> dict:
    flags: dict = {"responses": {str(rid): names for rid, names in payload.flags.items()}}
    if payload.flag_note:
        flags["note"] = payload.flag_note
    return flags
