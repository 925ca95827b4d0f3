"""Reading the annotation data in bounded pages: tasks by keyset on their id, with everything a row needs.

An export walks the tasks that have at least one matching annotation in id order, `page_size` tasks at a
time (`WHERE tasks.id > :last ORDER BY tasks.id LIMIT :n`), and loads each page's prompts, shown
responses, annotations and comparisons with four IN queries. Memory therefore depends on the page size,
never on the size of the export, and a page holds whole tasks, which agreement needs (it compares every
annotation of a task). Only plain column tuples are selected, so no ORM identity map grows either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from sqlalchemy import Select, exists, false, func, select
from sqlalchemy.orm import Session

from app.data.models import Annotation, Comparison, Policy, Prompt, PromptSet, Response, Task, TaskResponse
from app.services.exports.agreement import Judgement, consensus_scores, mean_outcome_agreement, pair_agreement
from app.services.exports.spec import ExportSpec

DEFAULT_PAGE_SIZE = 500


def as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every timestamp we store is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def clean_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as {role, content} string pairs only, so every file has the same schema."""
    out = []
    for message in messages or []:
        if isinstance(message, dict):
            out.append(
                {"role": str(message.get("role") or "user"), "content": str(message.get("content") or "")}
            )
    return out


@dataclass(frozen=True, slots=True)
class PromptInfo:
    id: int
    prompt_set_id: int
    prompt_set: str
    messages: list[dict[str, str]]
    text: str
    content_hash: str
    split: str


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    id: int
    text: str
    policy_version: int | None
    position: int | None  # None: referenced by a comparison but not among the task's shown responses


@dataclass(frozen=True, slots=True)
class AnnotationInfo:
    id: int
    user_id: int
    ranking: list[list[int]]
    all_bad: bool
    skipped: bool
    skip_reason: str
    flags: dict[str, Any]
    rationale: str
    time_spent_ms: int
    shown_order_unchanged: bool
    created_at: datetime

    @property
    def flagged(self) -> bool:
        flags = self.flags
        if isinstance(flags, dict):
            return any(bool(v) for v in flags.values())
        return bool(flags)

    @property
    def flag_names(self) -> list[str]:
        """Flag names raised on any response; stored as {"responses": {response_id: [names]}, "note": …}."""
        per_response = self.flags.get("responses") or {}
        return sorted({name for names in per_response.values() for name in names})


@dataclass(frozen=True, slots=True)
class ComparisonInfo:
    id: int
    annotation_id: int
    chosen: int
    rejected: int
    margin: float


@dataclass
class TaskBundle:
    """One task with its prompt, shown responses, every annotation and (when asked) its comparisons."""

    task_id: int
    kind: str
    prompt: PromptInfo
    shown: list[ResponseInfo] = field(default_factory=list)
    annotations: list[AnnotationInfo] = field(default_factory=list)
    comparisons: list[ComparisonInfo] = field(default_factory=list)
    extra_responses: dict[int, ResponseInfo] = field(default_factory=dict)

    @cached_property
    def _responses(self) -> dict[int, ResponseInfo]:
        return {r.id: r for r in self.shown} | self.extra_responses

    def response(self, response_id: int) -> ResponseInfo | None:
        return self._responses.get(response_id)

    @cached_property
    def _annotations(self) -> dict[int, AnnotationInfo]:
        return {a.id: a for a in self.annotations}

    def annotation(self, annotation_id: int) -> AnnotationInfo | None:
        return self._annotations.get(annotation_id)

    @cached_property
    def judgements(self) -> list[Judgement]:
        """Every non-skipped annotation of the task, whatever the row filters: agreement is the task's."""
        return [Judgement(a.id, a.ranking or [], a.all_bad) for a in self.annotations if not a.skipped]

    @cached_property
    def _judgement_by_id(self) -> dict[int, Judgement]:
        return {j.annotation_id: j for j in self.judgements}

    def judgement(self, annotation_id: int) -> Judgement | None:
        return self._judgement_by_id.get(annotation_id)

    def pair_agreement(self, annotation_id: int, x: int, y: int, outcome: str) -> tuple[float, int]:
        return pair_agreement(self.judgements, annotation_id, x, y, outcome)

    @cached_property
    def scores(self) -> dict[int, float | None]:
        return consensus_scores(self.judgements, [r.id for r in self.shown])

    def mean_outcome_agreement(self, response_ids: Sequence[int]) -> float | None:
        return mean_outcome_agreement(self.judgements, response_ids)


# ---------------------------------------------------------------- queries


def _matching_tasks(spec: ExportSpec, columns: Sequence[Any], excluded_users: Collection[int] = ()) -> Select:
    """Tasks in the chosen prompt sets with at least one usable annotation in the date range."""
    query = select(*columns).select_from(Task)
    if spec.prompt_set_ids:
        query = query.join(Prompt, Prompt.id == Task.prompt_id).where(
            Prompt.prompt_set_id.in_(spec.prompt_set_ids)
        )
    annotation = select(Annotation.id).where(Annotation.task_id == Task.id)
    if spec.since is not None:
        annotation = annotation.where(Annotation.created_at >= spec.since)
    if spec.until is not None:
        annotation = annotation.where(Annotation.created_at < spec.until)
    if spec.exclude_skipped or spec.format != "rankings":
        annotation = annotation.where(Annotation.skipped.is_(false()))
    if excluded_users:
        annotation = annotation.where(Annotation.user_id.not_in(sorted(excluded_users)))
    return query.where(exists(annotation))


def count_tasks(db: Session, spec: ExportSpec, excluded_users: Collection[int] = ()) -> int:
    return int(db.scalar(_matching_tasks(spec, [func.count(Task.id)], excluded_users)) or 0)


def iter_task_bundles(
    db: Session,
    spec: ExportSpec,
    *,
    need_comparisons: bool,
    page_size: int = DEFAULT_PAGE_SIZE,
    excluded_users: Collection[int] = (),
) -> Iterator[TaskBundle]:
    """Every matching task as a TaskBundle, in task id order, `page_size` tasks per round of queries.

    Annotations of `excluded_users` (annotators the quality gate excludes) are left out entirely: they
    give no rows and do not count towards agreement.
    """
    last_id = 0
    while True:
        query = _matching_tasks(spec, [Task.id], excluded_users)
        ids = list(
            db.connection()
            .execute(query.where(Task.id > last_id).order_by(Task.id).limit(page_size))
            .scalars()
        )
        if not ids:
            return
        yield from load_bundles(db, ids, need_comparisons=need_comparisons, excluded_users=excluded_users)
        last_id = ids[-1]
        if len(ids) < page_size:
            return


def load_bundles(
    db: Session, task_ids: Sequence[int], *, need_comparisons: bool, excluded_users: Collection[int] = ()
) -> list[TaskBundle]:
    # Core execution (no ORM result processing): these are plain column tuples, and it is ~2x faster.
    conn = db.connection()
    bundles: dict[int, TaskBundle] = {}
    for row in conn.execute(
        select(
            Task.id,
            Task.kind,
            Prompt.id,
            Prompt.prompt_set_id,
            PromptSet.name,
            Prompt.messages,
            Prompt.text,
            Prompt.content_hash,
            Prompt.split,
        )
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(Task.id.in_(task_ids))
        .order_by(Task.id)
    ):
        task_id, kind, prompt_id, set_id, set_name, messages, text, content_hash, split = row
        prompt = PromptInfo(prompt_id, set_id, set_name, clean_messages(messages), text, content_hash, split)
        bundles[task_id] = TaskBundle(task_id, kind, prompt)

    for task_id, position, response_id, text, version in conn.execute(
        select(TaskResponse.task_id, TaskResponse.position, Response.id, Response.text, Policy.version)
        .join(Response, Response.id == TaskResponse.response_id)
        .outerjoin(Policy, Policy.id == Response.policy_id)
        .where(TaskResponse.task_id.in_(task_ids))
        .order_by(TaskResponse.task_id, TaskResponse.position)
    ):
        bundles[task_id].shown.append(ResponseInfo(response_id, text, version, position))

    for row in conn.execute(
        select(
            Annotation.task_id,
            Annotation.id,
            Annotation.user_id,
            Annotation.ranking,
            Annotation.all_bad,
            Annotation.skipped,
            Annotation.skip_reason,
            Annotation.flags,
            Annotation.rationale,
            Annotation.time_spent_ms,
            Annotation.shown_order_unchanged,
            Annotation.created_at,
        )
        .where(Annotation.task_id.in_(task_ids))
        .order_by(Annotation.id)
    ):
        task_id, *values = row
        if values[1] in excluded_users:
            continue
        values[-1] = as_utc(values[-1])
        ranking = [[int(r) for r in group] for group in (values[2] or [])]
        bundles[task_id].annotations.append(
            AnnotationInfo(
                values[0],
                values[1],
                ranking,
                bool(values[3]),
                bool(values[4]),
                values[5] or "",
                values[6] or {},
                values[7] or "",
                values[8] or 0,
                bool(values[9]),
                values[10],
            )
        )

    if need_comparisons:
        for task_id, cid, annotation_id, chosen, rejected, margin in conn.execute(
            select(
                Annotation.task_id,
                Comparison.id,
                Comparison.annotation_id,
                Comparison.chosen_response_id,
                Comparison.rejected_response_id,
                Comparison.margin,
            )
            .join(Annotation, Annotation.id == Comparison.annotation_id)
            .where(Annotation.task_id.in_(task_ids))
            .order_by(Comparison.id)
        ):
            if bundles[task_id].annotation(annotation_id) is None:
                continue  # an excluded annotator's
            bundles[task_id].comparisons.append(
                ComparisonInfo(cid, annotation_id, chosen, rejected, float(margin))
            )
        _load_unshown_responses(db, bundles.values())
    return [bundles[t] for t in task_ids if t in bundles]


def _load_unshown_responses(db: Session, bundles: Sequence[TaskBundle] | Any) -> None:
    """Comparisons normally name shown responses; fetch any that are not, rather than drop the pair."""
    wanted: dict[int, list[TaskBundle]] = {}
    for bundle in bundles:
        for c in bundle.comparisons:
            for rid in (c.chosen, c.rejected):
                if bundle.response(rid) is None:
                    wanted.setdefault(rid, []).append(bundle)
    if not wanted:
        return
    for response_id, text, version in db.execute(
        select(Response.id, Response.text, Policy.version)
        .outerjoin(Policy, Policy.id == Response.policy_id)
        .where(Response.id.in_(list(wanted)))
    ):
        for bundle in wanted[response_id]:
            bundle.extra_responses[response_id] = ResponseInfo(response_id, text, version, None)
            bundle.__dict__.pop("_responses", None)  # drop the cached lookup
