"""An annotator's own recent judgements, and revising one of them.

A judgement may be revised while it can still change what the loop learns from it: its task is not
closed, it was not a skip, and no training round has frozen its comparisons yet (a round trains on
the comparisons up to its snapshot id; changing those would make the round's data disappear from
under it). The annotation row and its comparisons always hold the latest version, so exports and
rounds read the latest; each version a revision replaces is kept in annotation_revisions.

Revisions are rare, so they go through the ORM on both databases (one code path); submission's hot
path (app.data.statements) is untouched. Lock order as everywhere: the task row first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.data.db import is_postgres
from app.data.models import (
    Annotation,
    AnnotationRevision,
    Comparison,
    Prompt,
    Response,
    Round,
    Task,
    TaskResponse,
    utcnow,
)
from app.services.annotation import AnnotationError, derive_comparisons, flags_json, normalise, payload_hash
from app.services.assignment import TaskResponseView, TaskView
from app.services.schemas import AnnotationIn

RECENT_LIMIT = 30


@dataclass(frozen=True)
class JudgementSummary:
    """One line of an annotator's history."""

    annotation_id: int
    task_id: int
    prompt_text: str
    created_at: datetime
    revised_at: datetime | None
    revision: int
    outcome: str  # "ranked" | "all bad" | "skipped"
    order: str  # the ranking in the labels the annotator saw, e.g. "3 = 1 > 4 > 2"
    not_revisable: str | None  # why it cannot be revised any more, or None


def _labels_of_tasks(db: Session, task_ids: list[int]) -> dict[int, dict[int, int]]:
    """Per task: response id → the number shown on its card (1-based position), in one query."""
    labels: dict[int, dict[int, int]] = {task_id: {} for task_id in task_ids}
    rows = db.execute(
        select(TaskResponse.task_id, TaskResponse.response_id, TaskResponse.position).where(
            TaskResponse.task_id.in_(task_ids)
        )
    ).all()
    for row in rows:
        labels[row.task_id][row.response_id] = row.position + 1
    return labels


def shown_order(db: Session, task_id: int) -> list[int]:
    """The task's response ids in the order shown."""
    return list(
        db.scalars(
            select(TaskResponse.response_id)
            .where(TaskResponse.task_id == task_id)
            .order_by(TaskResponse.position)
        ).all()
    )


def order_text(ranking: list[list[int]], labels: dict[int, int]) -> str:
    """A ranking in the numbers its responses had on screen, e.g. "3 = 4 > 1 > 2"."""
    missing = len(labels) + 1
    return " > ".join(
        " = ".join(str(label) for label in sorted(labels.get(rid, missing) for rid in group)).replace(
            str(missing), "?"
        )
        for group in ranking
    )


def _frozen_snapshot(db: Session) -> int:
    """The highest comparison id a training round took (cancelled rounds took none)."""
    return db.scalar(select(func.max(Round.comparison_snapshot)).where(Round.status != "cancelled")) or 0


def _first_comparison_id(db: Session, annotation_id: int) -> int | None:
    return db.scalar(select(func.min(Comparison.id)).where(Comparison.annotation_id == annotation_id))


def why_not_revisable(
    db: Session, annotation: Annotation, task_status: str, frozen_snapshot: int | None = None
) -> str | None:
    """Why this judgement can no longer be revised, in words for its annotator; None if it can.
    `frozen_snapshot` (from _frozen_snapshot) spares a list of judgements asking it once per row."""
    if annotation.skipped:
        return "a skipped task cannot be revised"
    if task_status == "closed":
        return "its task is closed"
    first = _first_comparison_id(db, annotation.id)
    frozen = _frozen_snapshot(db) if frozen_snapshot is None else frozen_snapshot
    if first is not None and first <= frozen:
        return "a training round has already used it"
    return None


def revision_blocker(db: Session, annotation: Annotation) -> str | None:
    """why_not_revisable, looking up the task's status."""
    return why_not_revisable(
        db, annotation, db.scalar(select(Task.status).where(Task.id == annotation.task_id))
    )


def recent_judgements(db: Session, user_id: int, limit: int = RECENT_LIMIT) -> list[JudgementSummary]:
    """The annotator's latest judgements (skips included), newest first."""
    rows = db.execute(
        select(Annotation, Task.status, Prompt.text)
        .join(Task, Task.id == Annotation.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Annotation.user_id == user_id)
        .order_by(Annotation.id.desc())
        .limit(limit)
    ).all()
    labels = _labels_of_tasks(db, [annotation.task_id for annotation, _, _ in rows])
    frozen = _frozen_snapshot(db)
    out = []
    for annotation, task_status, prompt_text in rows:
        if annotation.skipped:
            outcome, order = "skipped", annotation.skip_reason
        elif annotation.all_bad:
            outcome, order = "all bad", ""
        else:
            outcome, order = "ranked", order_text(annotation.ranking, labels[annotation.task_id])
        out.append(
            JudgementSummary(
                annotation_id=annotation.id,
                task_id=annotation.task_id,
                prompt_text=prompt_text,
                created_at=annotation.created_at,
                revised_at=annotation.revised_at,
                revision=annotation.revision,
                outcome=outcome,
                order=order,
                not_revisable=why_not_revisable(db, annotation, task_status, frozen),
            )
        )
    return out


def own_annotation(db: Session, annotation_id: int, user_id: int) -> Annotation:
    """The caller's annotation; 404 for one that does not exist or is someone else's (same words)."""
    annotation = db.get(Annotation, annotation_id)
    if annotation is None or annotation.user_id != user_id:
        raise AnnotationError(404, f"you have no judgement {annotation_id}")
    return annotation


@dataclass(frozen=True)
class JudgedTask:
    """A judged task laid out for revising: rank tasks show the responses in the order ranked (ties
    in `tied`: the ids tied with the one before them); arena tasks keep their sides and say the
    `verdict` ("1", "2", "tie", or "" for all bad)."""

    view: TaskView
    tied: list[int]
    verdict: str


def judged_task_view(db: Session, annotation: Annotation) -> JudgedTask:
    """The task as its annotator saw it, laid out as they judged it."""
    task = db.get(Task, annotation.task_id)
    prompt = db.get(Prompt, task.prompt_id)
    rows = db.execute(
        select(TaskResponse.position, Response.id, Response.text)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(TaskResponse.task_id == task.id)
        .order_by(TaskResponse.position)
    ).all()
    responses = {row.id: TaskResponseView(id=row.id, position=row.position, text=row.text) for row in rows}
    shown = list(responses.values())
    ordered, tied, verdict = shown, [], ""
    ranked = [rid for group in annotation.ranking for rid in group]
    if not annotation.all_bad and sorted(ranked) == sorted(responses):
        if task.kind == "arena":
            best = annotation.ranking[0]
            verdict = "tie" if len(best) > 1 else ("1" if best[0] == shown[0].id else "2")
        else:
            ordered = [responses[rid] for rid in ranked]
            tied = [rid for group in annotation.ranking for rid in group[1:]]
    view = TaskView(
        id=task.id,
        kind=task.kind,
        prompt_id=task.prompt_id,
        messages=list(prompt.messages),
        responses=ordered,
        expires_at=utcnow(),
    )
    return JudgedTask(view=view, tied=tied, verdict=verdict)


def _check_against_task(payload: AnnotationIn, shown: list[int]) -> None:
    task = set(shown)
    named = [rid for group in payload.ranking for rid in group]
    if payload.ranking and (len(named) != len(shown) or set(named) != task):
        raise AnnotationError(422, "rank every response of the task once")
    if set(payload.flags) - task:
        raise AnnotationError(422, "flags name responses that are not in this task")


def revise_annotation(db: Session, annotation_id: int, user_id: int, payload: AnnotationIn) -> Annotation:
    """Replace the caller's judgement with `payload` (committed), keeping the replaced version.

    The same judgement again changes nothing. Raises AnnotationError (404, 409, 422) saying why.
    """
    if payload.skip:
        raise AnnotationError(422, "a revision cannot skip the task; judge it, or mark all responses bad")
    annotation = own_annotation(db, annotation_id, user_id)
    lock = select(Task.status).where(Task.id == annotation.task_id)
    if is_postgres(db):
        lock = lock.with_for_update()
    task_status = db.scalar(lock)
    db.refresh(annotation)  # as of after the lock: a concurrent revision of the same judgement
    reason = why_not_revisable(db, annotation, task_status)
    if reason:
        raise AnnotationError(409, f"judgement {annotation_id} cannot be revised: {reason}")
    shown = shown_order(db, annotation.task_id)
    _check_against_task(payload, shown)
    new = normalise(payload)
    digest = payload_hash(new, normalised=True)
    if digest == annotation.payload_hash:
        db.rollback()
        return annotation
    now = utcnow()
    db.add(
        AnnotationRevision(
            annotation_id=annotation.id,
            revision=annotation.revision,
            ranking=annotation.ranking,
            all_bad=annotation.all_bad,
            flags=annotation.flags,
            rationale=annotation.rationale,
            time_spent_ms=annotation.time_spent_ms,
            shown_order_unchanged=annotation.shown_order_unchanged,
            payload_hash=annotation.payload_hash,
            made_at=annotation.revised_at or annotation.created_at,
            replaced_at=now,
        )
    )
    named = [rid for group in new.ranking for rid in group]
    annotation.ranking = json.loads(json.dumps(new.ranking))
    annotation.all_bad = new.all_bad
    annotation.flags = flags_json(new)
    annotation.rationale = new.rationale
    annotation.time_spent_ms = new.time_spent_ms
    annotation.shown_order_unchanged = (
        not new.all_bad and all(len(group) == 1 for group in new.ranking) and named == shown
    )
    annotation.payload_hash = digest
    annotation.revision += 1
    annotation.revised_at = now
    prompt_id = db.scalar(select(Task.prompt_id).where(Task.id == annotation.task_id))
    replaced_first = _first_comparison_id(db, annotation.id)
    db.execute(delete(Comparison).where(Comparison.annotation_id == annotation.id))
    db.add_all(
        Comparison(
            annotation_id=annotation.id,
            prompt_id=prompt_id,
            chosen_response_id=pair.chosen,
            rejected_response_id=pair.rejected,
            margin=pair.margin,
            created_at=now,
        )
        for pair in derive_comparisons(new.ranking, new.all_bad)
    )
    # A round that started meanwhile may have taken the comparisons being replaced: look again last.
    if replaced_first is not None and replaced_first <= _frozen_snapshot(db):
        db.rollback()
        raise AnnotationError(
            409, f"judgement {annotation_id} cannot be revised: a training round has just used it"
        )
    db.commit()
    return annotation
