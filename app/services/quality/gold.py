"""Gold tasks: tasks whose best response an admin knows, shown to every annotator once.

- Accuracy: an answer is correct when the annotator's top tie group contains the gold response
  (an all-bad answer is wrong: the gold response is known to be good). Skips do not count.
- Flagging: an annotator with at least `gold_min_answers` answered gold tasks and accuracy under
  `gold_min_accuracy` is flagged; with `exclude_flagged_annotators` on, their comparisons leave
  training data and exports (`usable_comparisons_query`, `usable_annotation_clause`).
- Rounds record which annotations they used (`round_annotations`), because flags move over time.
- Assignment: `choose_gold` is the hook the task selection calls before its normal choice.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, delete, exists, func, insert, literal, select, true, update
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.data.models import (
    Annotation,
    Assignment,
    Comparison,
    Prompt,
    Response,
    RoundAnnotation,
    Task,
    TaskResponse,
    User,
)
from app.services.pool_settings import task_overlap
from app.services.quality.agreement import load_task_rankings
from app.services.quality.intervals import Estimate, wilson_interval

# ---------------------------------------------------------------- accuracy and flags


@dataclass(frozen=True)
class GoldAccuracy:
    user_id: int
    username: str
    answered: int  # gold tasks answered (not skipped)
    correct: int
    skipped: int
    accuracy: Estimate  # with a 95% Wilson interval
    flagged: bool


def is_gold_correct(ranking: list[list[int]] | None, all_bad: bool, gold_response_id: int) -> bool:
    """Did the annotator's top group contain the gold response?"""
    if all_bad or not ranking:
        return False
    return gold_response_id in {int(r) for r in ranking[0]}


def gold_accuracy(db: Session, settings: Settings | None = None) -> list[GoldAccuracy]:
    """Every annotator who met a gold task, with accuracy, its interval and the flag."""
    settings = settings or get_settings()
    rows = db.execute(
        select(
            Annotation.user_id,
            Annotation.ranking,
            Annotation.all_bad,
            Annotation.skipped,
            Task.gold_response_id,
        )
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.is_gold.is_(True), Task.gold_response_id.is_not(None))
    )
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # answered, correct, skipped
    for user_id, ranking, all_bad, skipped, gold_id in rows:
        counts = tally[user_id]
        if skipped:
            counts[2] += 1
            continue
        counts[0] += 1
        counts[1] += is_gold_correct(ranking, all_bad, gold_id)
    names = dict(db.execute(select(User.id, User.username).where(User.id.in_(list(tally)))).all())
    result = []
    for user_id, (answered, correct, skipped) in tally.items():
        accuracy = wilson_interval(correct, answered)
        flagged = answered >= settings.gold_min_answers and accuracy.value < settings.gold_min_accuracy
        result.append(
            GoldAccuracy(
                user_id, names.get(user_id, str(user_id)), answered, correct, skipped, accuracy, flagged
            )
        )
    return sorted(result, key=lambda g: (not g.flagged, g.username))


def flagged_annotator_ids(db: Session, settings: Settings | None = None) -> set[int]:
    """Annotators whose gold accuracy is under the threshold (whether or not exclusion is on)."""
    return {g.user_id for g in gold_accuracy(db, settings) if g.flagged}


def excluded_annotator_ids(db: Session, settings: Settings | None = None) -> set[int]:
    """Annotators whose comparisons training data and exports must leave out right now."""
    settings = settings or get_settings()
    if not settings.exclude_flagged_annotators:
        return set()
    return flagged_annotator_ids(db, settings)


# ---------------------------------------------------------------- the usable-data filter


def usable_annotation_clause(db: Session, settings: Settings | None = None) -> ColumnElement[bool]:
    """A WHERE clause on `Annotation` that drops excluded annotators (TRUE when nobody is excluded).

    For queries that already join annotations (raw rankings, arena battles):
    `select(Annotation).where(usable_annotation_clause(db))`.
    """
    excluded = sorted(excluded_annotator_ids(db, settings))
    if not excluded:
        return true()
    return Annotation.user_id.not_in(excluded)


def usable_comparisons_query(
    db: Session, settings: Settings | None = None, up_to_comparison_id: int | None = None
) -> Select[tuple[Comparison]]:
    """SELECT of the comparisons that may be trained on or exported, in id order.

    Joins each comparison's annotation and applies `usable_annotation_clause`. `up_to_comparison_id`
    freezes a round's snapshot (rounds.comparison_snapshot). Add further filters with `.where()`:
    the statement already joins `Annotation`.
    """
    query = (
        select(Comparison)
        .join(Annotation, Annotation.id == Comparison.annotation_id)
        .where(usable_annotation_clause(db, settings))
        .order_by(Comparison.id)
    )
    if up_to_comparison_id is not None:
        query = query.where(Comparison.id <= up_to_comparison_id)
    return query


# ---------------------------------------------------------------- what each round used


def record_round_annotations(db: Session, round_id: int, annotation_ids: Iterable[int]) -> int:
    """Record that a round trained on these annotations; idempotent (a retried round adds nothing twice).

    Returns the number of new rows. The caller commits.
    """
    wanted = {int(a) for a in annotation_ids}
    if not wanted:
        return 0
    existing = set(
        db.scalars(select(RoundAnnotation.annotation_id).where(RoundAnnotation.round_id == round_id))
    )
    new = sorted(wanted - existing)
    for start in range(0, len(new), 5000):
        chunk = new[start : start + 5000]
        db.execute(insert(RoundAnnotation), [{"round_id": round_id, "annotation_id": a} for a in chunk])
    return len(new)


def record_usable_annotations(
    db: Session, round_id: int, up_to_comparison_id: int | None = None, settings: Settings | None = None
) -> int:
    """Record every annotation behind `usable_comparisons_query` for a round (one INSERT ... SELECT)."""
    usable = usable_comparisons_query(db, settings, up_to_comparison_id).subquery()
    already = select(RoundAnnotation.annotation_id).where(RoundAnnotation.round_id == round_id)
    source = (
        select(literal(round_id).label("round_id"), usable.c.annotation_id)
        .where(usable.c.annotation_id.not_in(already))
        .distinct()
    )
    count = select(func.count()).select_from(RoundAnnotation).where(RoundAnnotation.round_id == round_id)
    before = db.scalar(count) or 0
    db.execute(insert(RoundAnnotation).from_select(["round_id", "annotation_id"], source))
    # rowcount of INSERT ... SELECT is not reported by every driver; counting is.
    return (db.scalar(count) or 0) - before


def round_annotation_ids(db: Session, round_id: int) -> list[int]:
    return list(
        db.scalars(
            select(RoundAnnotation.annotation_id)
            .where(RoundAnnotation.round_id == round_id)
            .order_by(RoundAnnotation.annotation_id)
        )
    )


# ---------------------------------------------------------------- gold task management


class GoldError(ValueError):
    """A gold-task request that cannot be honoured; the message says what to fix."""


def mark_gold(db: Session, task_id: int, response_id: int, settings: Settings | None = None) -> Task:
    """Make a task gold with a known best response. The caller commits.

    The task opens to every annotator (its cap rises to `gold_max_annotations`), and its responses
    are rotated so the gold one is shown last: an annotator who submits the shown order unchanged
    then misses every gold task instead of passing some by luck.
    """
    settings = settings or get_settings()
    task = db.get(Task, task_id)
    if task is None:
        raise GoldError(f"Task {task_id} does not exist.")
    order = [item.response_id for item in task.items]
    if response_id not in order:
        raise GoldError(f"Response {response_id} is not one of task {task_id}'s responses {order}.")
    task.is_gold = True
    task.gold_response_id = response_id
    task.required_annotations = max(
        task.required_annotations, task.annotation_count, settings.gold_max_annotations
    )
    task.status = "open"
    k = order.index(response_id)
    rotated = order[k + 1 :] + order[: k + 1]
    if rotated != order:
        # Positions are part of the key: park them on negatives first so no two rows collide.
        db.execute(
            update(TaskResponse)
            .where(TaskResponse.task_id == task_id)
            .values(position=-1 - TaskResponse.position)
        )
        for position, rid in enumerate(rotated):
            db.execute(
                update(TaskResponse)
                .where(TaskResponse.task_id == task_id, TaskResponse.response_id == rid)
                .values(position=position)
            )
        db.expire(task, ["items"])
    db.flush()
    return task


def unmark_gold(db: Session, task_id: int, settings: Settings | None = None) -> Task:
    """Turn a gold task back into an ordinary one (cap back to the normal overlap). The caller commits."""
    settings = settings or get_settings()
    task = db.get(Task, task_id)
    if task is None:
        raise GoldError(f"Task {task_id} does not exist.")
    task.is_gold = False
    task.gold_response_id = None
    overlap = task_overlap(db, settings)
    task.required_annotations = max(task.annotation_count, task.claimed_count, overlap, 1)
    task.status = "done" if task.annotation_count >= task.required_annotations else "open"
    db.flush()
    return task


@dataclass(frozen=True)
class GoldTaskRow:
    task_id: int
    prompt_text: str
    gold_response_id: int
    gold_text: str
    answered: int
    correct: int
    skipped: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


def gold_tasks(db: Session) -> list[GoldTaskRow]:
    """Every gold task with how often annotators found its best response."""
    tasks = db.execute(
        select(Task.id, Prompt.text, Task.gold_response_id, Response.text)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(Response, Response.id == Task.gold_response_id)
        .where(Task.is_gold.is_(True))
        .order_by(Task.id)
    ).all()
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    answers = db.execute(
        select(
            Annotation.task_id,
            Annotation.ranking,
            Annotation.all_bad,
            Annotation.skipped,
            Task.gold_response_id,
        )
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.is_gold.is_(True), Task.gold_response_id.is_not(None))
    )
    for task_id, ranking, all_bad, skipped, gold_id in answers:
        if skipped:
            tally[task_id][2] += 1
        else:
            tally[task_id][0] += 1
            tally[task_id][1] += is_gold_correct(ranking, all_bad, gold_id)
    return [GoldTaskRow(tid, ptext, gid, gtext, *tally[tid]) for tid, ptext, gid, gtext in tasks]


@dataclass(frozen=True)
class GoldCandidate:
    task_id: int
    response_id: int
    annotators: int  # every one of them put this response alone on top


def gold_candidates(
    db: Session, min_annotators: int = 3, limit: int = 20, settings: Settings | None = None
) -> list[GoldCandidate]:
    """Ordinary rank tasks where at least `min_annotators` annotators (excluded ones not counted)
    unanimously put one response alone on top."""
    ineligible = set(db.scalars(select(Task.id).where((Task.is_gold.is_(True)) | (Task.kind != "rank"))))
    tasks = load_task_rankings(db, exclude_user_ids=excluded_annotator_ids(db, settings))
    found = []
    for task in tasks:
        if task.task_id in ineligible or len(task.rankings) < min_annotators:
            continue
        tops = set()
        for ranks in task.rankings.values():
            best = [r for r, rank in ranks.items() if rank == 1.0]  # rank 1.0 = alone in first place
            tops.add(best[0] if len(best) == 1 else None)
        if len(tops) == 1 and None not in tops:
            found.append(GoldCandidate(task.task_id, tops.pop(), len(task.rankings)))
    found.sort(key=lambda c: (-c.annotators, c.task_id))
    return found[:limit]


# ---------------------------------------------------------------- assignment hook


def choose_gold(db: Session, user_id: int, share: float, rng: random.Random) -> Task | None:
    """With probability `share`, a gold task this annotator has never been assigned; else None.

    Called by the task selection before its normal choice; the caller claims the slot and creates
    the assignment exactly as for any task. Returns None when the draw says "not gold" or no gold
    task is left for this annotator.
    """
    if share <= 0 or rng.random() >= share:
        return None
    # Probed per gold task (there are few), not read in full: an annotator's history only grows.
    seen = exists().where(Assignment.task_id == Task.id, Assignment.user_id == user_id)
    answered = exists().where(Annotation.task_id == Task.id, Annotation.user_id == user_id)
    ids = db.scalars(
        select(Task.id).where(
            Task.is_gold,  # as the partial index ix_tasks_gold_open says it (not IS TRUE), so it is used
            Task.gold_response_id.is_not(None),
            Task.status == "open",
            Task.claimed_count < Task.required_annotations,
            Task.annotation_count < Task.required_annotations,
            ~seen,
            ~answered,
        )
    ).all()
    if not ids:
        return None
    return db.get(Task, rng.choice(sorted(ids)))


def delete_round_annotations(db: Session, round_id: int) -> None:
    """Forget what a round recorded (a round restarted from scratch re-records its data)."""
    db.execute(delete(RoundAnnotation).where(RoundAnnotation.round_id == round_id))


@dataclass(frozen=True)
class GoldChoice:
    """An ordinary task an admin may make gold, as the list on the gold page shows it."""

    task_id: int
    kind: str
    status: str
    prompt_text: str
    annotations: int


def gold_choices(db: Session, search: str = "", limit: int = 25) -> list[GoldChoice]:
    """The newest ordinary tasks, or those whose prompt contains `search` (any case): the list the
    admin picks a gold task from."""
    query = (
        select(Task.id, Task.kind, Task.status, Prompt.text, Task.annotation_count)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.is_gold.is_(False))
        .order_by(Task.id.desc())
        .limit(limit)
    )
    if search.strip():
        query = query.where(func.lower(Prompt.text).contains(search.strip().lower(), autoescape=True))
    return [GoldChoice(*row) for row in db.execute(query)]
