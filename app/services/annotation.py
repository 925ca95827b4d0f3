"""Submitting a judgement: validate it against the task, store it once, derive pairwise comparisons.

Rules:
- one annotation per (task, annotator); the same payload again returns the same result, a different
  one is refused with 409 (the payload hash decides; time spent is measurement, not judgement);
- a ranking names every response of the task exactly once; repeated ids and more ids than any task
  shows are refused with 422 before anything else (pairs grow with the square of the ids), unknown,
  foreign and missing ids are refused with 422 and named, to the task's annotators only: a task the
  caller holds no assignment for is refused with the same 409 whatever the ranking, naming no ids;
- comparisons: every response in a better tie group beats every response in a worse one, with
  margin = the distance between the groups (adjacent groups 1, one group between them 2, …);
  responses in the same group (ties) give none; an all-bad judgement is kept and gives none;
- a skip stores the reason, gives the slot back to the pool and never counts towards the overlap.

A judgement is stored by one statement (Statement.STORE_JUDGEMENT) that locks the task row first (the
order assignment and expiry use too), so counters and the annotation row commit together or not at
all; it derives the comparisons itself, only once the ranking fits the responses shown, and says which
rule refused a judgement; the messages are made here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from app.data.models import utcnow
from app.data.statements import IntegrityConflict, Statement, StatementRunner
from app.data.statements.pairs import Pair, derive_pairs
from app.services.schemas import AnnotationIn, AnnotationResult, ranking_problem


class AnnotationError(Exception):
    """A submission that cannot be accepted; `status` is the HTTP code, the message says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
    """Pairs (chosen beats rejected) from tie groups best→worst; margin is the group distance.
    Counting only: the pairs stored are derived by the storing statement, after its checks."""
    return derive_pairs(ranking, all_bad)


async def _check_ranking(statements: StatementRunner, payload: AnnotationIn, shown: list[int]) -> None:
    """422 naming every unknown, foreign or missing response id (repeats were refused before)."""
    task_ids = set(shown)
    problems = []
    named = [rid for group in payload.ranking for rid in group]
    outside = sorted(set(named) - task_ids)
    flagged_outside = sorted(set(payload.flags) - task_ids - set(outside))
    outside_all = sorted(set(outside) | set(flagged_outside))
    if outside_all:
        known = await statements.rows(Statement.KNOWN_RESPONSE_IDS, {"ids": outside_all})
        existing = {row.id for row in known}
        foreign = [rid for rid in outside_all if rid in existing]
        unknown = [rid for rid in outside_all if rid not in existing]
        if unknown:
            problems.append(f"unknown response ids {unknown}")
        if foreign:
            problems.append(f"response ids {foreign} belong to another task")
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


async def _stored(statements: StatementRunner, judgement: _Judgement) -> AnnotationResult | None:
    """The stored result of this annotator's judgement of the task; 409 if it was a different one."""
    found = await statements.rows(Statement.STORED_JUDGEMENT, judgement.key())
    if not found:
        return None
    row = found[0]
    if row.payload_hash != judgement.digest:
        raise AnnotationError(
            409,
            f"you already submitted a different judgement for task {judgement.task_id}; "
            "a submission cannot be changed",
        )
    comparisons = 0 if row.skipped else len(derive_comparisons(row.ranking, row.all_bad))
    return AnnotationResult(
        annotation_id=row.id,
        task_id=judgement.task_id,
        status="skipped" if row.skipped else "submitted",
        comparisons=comparisons,
        shown_order_unchanged=bool(row.shown_order_unchanged),
    )


async def submit_annotation(
    statements: StatementRunner, task_id: int, user_id: int, payload: AnnotationIn
) -> tuple[AnnotationResult, bool]:
    """Store a judgement (committed). Returns (result, created); created is False for a replay.

    Raises AnnotationError (404, 409, 422) with a message that says what to fix.
    """
    # The schema refuses these too; a payload built without validation must not reach the pairs.
    problem = ranking_problem(payload.ranking)
    if problem:
        raise AnnotationError(422, problem)
    judgement = _Judgement.of(task_id, user_id, payload)
    try:
        rows = await statements.rows(Statement.STORE_JUDGEMENT, judgement.params())
    except IntegrityConflict:
        return await _replay_of_concurrent_request(statements, judgement)
    outcome = _Outcome.of(rows[0])
    if outcome.status == "stored":
        return _result(outcome.annotation_id, task_id, judgement.payload, outcome.unchanged), True
    return await _replay_or_refuse(statements, judgement, outcome)


async def _replay_of_concurrent_request(
    statements: StatementRunner, judgement: _Judgement
) -> tuple[AnnotationResult, bool]:
    """A concurrent identical request (double click, client retry) stored the judgement first."""
    replay = await _stored(statements, judgement)
    if replay is None:
        raise AnnotationError(409, f"task {judgement.task_id} is being judged by another request of yours")
    return replay, False


async def _replay_or_refuse(
    statements: StatementRunner, judgement: _Judgement, outcome: _Outcome
) -> tuple[AnnotationResult, bool]:
    """A judgement that was not stored: the stored result of a replay, or an AnnotationError saying
    why it was refused."""
    task_id = judgement.task_id
    if outcome.status == "judged":
        replay = await _stored(statements, judgement)
        if replay is None:  # cannot happen: the assignment says it was judged
            raise AnnotationError(409, f"task {task_id} was already judged by you")
        return replay, False
    if outcome.status == "no_task":
        raise AnnotationError(404, f"there is no task {task_id}")
    if outcome.status == "not_assigned":  # said before the ranking is looked at: names no response ids
        raise AnnotationError(
            409, f"task {task_id} is not assigned to you; fetch one with GET /api/tasks/next"
        )
    if outcome.status == "invalid":
        await _check_ranking(statements, judgement.payload, outcome.shown)
        raise AnnotationError(422, f"rank every response of the task once: {sorted(outcome.shown)}")
    raise AnnotationError(
        409,
        f"task {task_id} no longer takes judgements (your assignment expired and the task was "
        "completed by others, or it was closed); fetch the next task",
    )


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
        )

    def key(self) -> dict[str, int]:
        return {"task_id": self.task_id, "user_id": self.user_id}

    def params(self) -> dict[str, Any]:
        """The arguments of Statement.STORE_JUDGEMENT (those of prefloop_submit_annotation)."""
        p = self.payload
        return {
            **self.key(),
            "named": self.named,
            "flagged": self.flagged,
            "order": self.named if self.no_ties else None,
            "skip": p.skip,
            "all_bad": p.all_bad,
            "ranking": json.dumps(p.ranking),
            "skip_reason": p.skip_reason,
            "flags": json.dumps(flags_json(p)),
            "rationale": p.rationale,
            "time_spent_ms": p.time_spent_ms,
            "payload_hash": self.digest,
            "now": utcnow(),
        }


@dataclass(frozen=True)
class _Outcome:
    status: str  # stored | no_task | judged | invalid | not_assigned | closed
    shown: list[int] = field(default_factory=list)
    annotation_id: int | None = None
    unchanged: bool = False

    @classmethod
    def of(cls, row: Any) -> _Outcome:
        """From the row of Statement.STORE_JUDGEMENT."""
        return cls(row.outcome, list(row.shown or []), row.new_annotation_id, bool(row.shown_order_unchanged))


def flags_json(payload: AnnotationIn) -> dict:
    """The flags column of a normalised judgement."""
    flags: dict = {"responses": {str(rid): names for rid, names in payload.flags.items()}}
    if payload.flag_note:
        flags["note"] = payload.flag_note
    return flags
