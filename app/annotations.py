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

from sqlalchemy import case, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import is_postgres
from app.models import Annotation, Assignment, Comparison, Response, Task, TaskResponse, utcnow
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


def payload_hash(payload: AnnotationIn) -> str:
    body = normalise(payload).model_dump(exclude={"time_spent_ms"})
    body["flags"] = {str(k): v for k, v in body["flags"].items()}
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


def submit_annotation(
    db: Session, task_id: int, user_id: int, payload: AnnotationIn
) -> tuple[AnnotationResult, bool]:
    """Store a judgement (committed). Returns (result, created); created is False for a replay.

    Raises AnnotationError (404, 409, 422) with a message that says what to fix.
    """
    payload = normalise(payload)
    digest = payload_hash(payload)
    replay = _existing(db, task_id, user_id, digest)
    if replay is not None:
        db.rollback()
        return replay, False
    try:
        result = _store(db, task_id, user_id, payload, digest)
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


def _store(db: Session, task_id: int, user_id: int, payload: AnnotationIn, digest: str) -> AnnotationResult:
    lock = select(Task.id, Task.prompt_id, Task.status).where(Task.id == task_id)
    if is_postgres(db):
        lock = lock.with_for_update()
    task = db.execute(lock).first()
    if task is None:
        raise AnnotationError(404, f"there is no task {task_id}")
    shown = list(
        db.scalars(
            select(TaskResponse.response_id)
            .where(TaskResponse.task_id == task_id)
            .order_by(TaskResponse.position)
        ).all()
    )
    _check_ranking(db, payload, shown)
    assignment = db.execute(
        select(Assignment.id, Assignment.status).where(
            Assignment.task_id == task_id, Assignment.user_id == user_id
        )
    ).first()
    if assignment is None:
        raise AnnotationError(
            409, f"task {task_id} is not assigned to you; fetch one with GET /api/tasks/next"
        )
    holds_slot = assignment.status == "active"
    if assignment.status not in ("active", "expired"):
        raise AnnotationError(409, f"task {task_id} is already {assignment.status} by you")

    if payload.skip:
        if holds_slot:  # the slot goes back to the pool for someone else
            db.execute(update(Task).where(Task.id == task_id).values(claimed_count=Task.claimed_count - 1))
        new_assignment_status = "skipped"
    else:
        # The assignment expired: it only counts if a slot is still free (nobody took it meanwhile).
        claim = 0 if holds_slot else 1
        counted = db.execute(
            update(Task)
            .where(
                Task.id == task_id,
                Task.status == "open",
                Task.annotation_count < Task.required_annotations,
                Task.claimed_count + claim <= Task.required_annotations,
            )
            .values(
                annotation_count=Task.annotation_count + 1,
                claimed_count=Task.claimed_count + claim,
                status=case(
                    (Task.annotation_count + 1 >= Task.required_annotations, "done"), else_=Task.status
                ),
            )
        ).rowcount
        if counted != 1:
            raise AnnotationError(
                409,
                f"task {task_id} no longer takes judgements (your assignment expired and the task was "
                "completed by others, or it was closed); fetch the next task",
            )
        new_assignment_status = "submitted"

    unchanged = (
        not payload.skip
        and not payload.all_bad
        and all(len(group) == 1 for group in payload.ranking)
        and [group[0] for group in payload.ranking] == shown
    )
    annotation_id = db.execute(
        insert(Annotation)
        .values(
            task_id=task_id,
            user_id=user_id,
            ranking=payload.ranking,
            all_bad=payload.all_bad,
            skipped=payload.skip,
            skip_reason=payload.skip_reason,
            flags=_flags_json(payload),
            rationale=payload.rationale,
            time_spent_ms=payload.time_spent_ms,
            shown_order_unchanged=unchanged,
            payload_hash=digest,
            created_at=utcnow(),
        )
        .returning(Annotation.id)
    ).scalar_one()
    pairs = [] if payload.skip else derive_comparisons(payload.ranking, payload.all_bad)
    if pairs:
        now = utcnow()
        db.execute(
            insert(Comparison),
            [
                {
                    "annotation_id": annotation_id,
                    "prompt_id": task.prompt_id,
                    "chosen_response_id": p.chosen,
                    "rejected_response_id": p.rejected,
                    "margin": p.margin,
                    "created_at": now,
                }
                for p in pairs
            ],
        )
    db.execute(update(Assignment).where(Assignment.id == assignment.id).values(status=new_assignment_status))
    db.commit()
    return _result(annotation_id, task_id, payload, unchanged)


def _flags_json(payload: AnnotationIn) -> dict:
    flags: dict = {"responses": {str(rid): names for rid, names in payload.flags.items()}}
    if payload.flag_note:
        flags["note"] = payload.flag_note
    return flags
