"""Pydantic request/response models of the JSON API; they also document it in OpenAPI."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.services.row_ids import RowId

# ---------------------------------------------------------------- annotation

FlagName = Literal["harmful", "nonsense", "private_data", "other"]
FLAG_NAMES: tuple[str, ...] = ("harmful", "nonsense", "private_data", "other")
FLAG_LABELS = {
    "harmful": "Harmful",
    "nonsense": "Nonsense",
    "private_data": "Private data",
    "other": "Other",
}
MAX_RATIONALE_CHARS = 5000
# A task shows responses_per_task responses (4 by default) or, in the arena, 2. Every pair of a
# ranking becomes a row, so the ids a ranking may name are capped well above what tasks show but low
# enough that a hostile body cannot ask for a quadratic number of pairs (16 ids: at most 120).
MAX_RANKED_RESPONSES = 16
MAX_REASON_CHARS = 500


class MessageOut(BaseModel):
    role: str
    content: str


class TaskResponseOut(BaseModel):
    id: int = Field(description="Response id; use it in the ranking you submit.")
    label: int = Field(description="1-based position as shown (the number key in the UI).")
    text: str = Field(description="Untrusted model output: render as escaped text or safe Markdown.")


class TaskOut(BaseModel):
    """A task as the annotator sees it: the same fields, alike, for a gold task and any other."""

    id: int
    kind: Literal["rank", "arena"] = Field(
        description="rank: order K responses of the live policy; arena: two policy versions, blind."
    )
    messages: list[MessageOut] = Field(description="The conversation the responses answer.")
    prompt: str = Field(description="The last user turn.")
    responses: list[TaskResponseOut]
    expires_at: datetime | None = Field(description="Submit before this or the slot returns to the pool.")


class AnnotationIn(BaseModel):
    """One judgement of a task. A ranking lists tie groups best→worst, e.g. [[12], [15, 14], [13]]
    means 12 is best, 15 and 14 tie second, 13 is worst."""

    model_config = ConfigDict(extra="forbid")

    ranking: list[list[RowId]] = Field(
        default_factory=list,
        description="Tie groups of response ids, best first. Every response of the task exactly once "
        "(may be empty only when skipping or when all_bad is set).",
        max_length=MAX_RANKED_RESPONSES,
    )
    all_bad: bool = Field(False, description="Every response is unacceptable; kept, but gives no pairs.")
    skip: bool = Field(False, description="Do not judge this task; the slot goes to someone else.")
    skip_reason: str = Field("", max_length=MAX_REASON_CHARS, description="Required when skipping.")
    flags: dict[int, list[FlagName]] = Field(
        default_factory=dict, description="Per response id: harmful, nonsense, private_data, other."
    )
    flag_note: str = Field("", max_length=MAX_REASON_CHARS, description="What 'other' means here.")
    rationale: str = Field("", max_length=MAX_RATIONALE_CHARS, description="Optional free-text reason.")
    time_spent_ms: int = Field(0, ge=0, le=24 * 3600 * 1000, description="Time on the task, client-measured.")

    @model_validator(mode="after")
    def _consistent(self) -> AnnotationIn:
        if self.skip:
            if not self.skip_reason.strip():
                raise ValueError("skip_reason: say why you skip (e.g. 'cannot judge', 'prompt unclear')")
            if self.ranking:
                raise ValueError("ranking: leave it empty when skipping")
        elif not self.ranking and not self.all_bad:
            raise ValueError("ranking: rank every response (tie groups best first), or set all_bad or skip")
        if any(not group for group in self.ranking):
            raise ValueError("ranking: a tie group is empty")
        problem = ranking_problem(self.ranking)
        if problem:
            raise ValueError(problem)
        return self


def ranking_problem(ranking: list[list[int]]) -> str | None:
    """What makes a ranking unacceptable whatever its task (too many or repeated ids), or None."""
    named = [rid for group in ranking for rid in group]
    if len(named) > MAX_RANKED_RESPONSES:
        return f"ranking: name at most {MAX_RANKED_RESPONSES} response ids, the task's responses"
    repeated = sorted(rid for rid, times in Counter(named).items() if times > 1)
    if repeated:
        return f"ranking: response ids {repeated} appear more than once"
    return None


class AnnotationResult(BaseModel):
    annotation_id: int
    task_id: int
    status: Literal["submitted", "skipped"]
    comparisons: int = Field(description="Pairwise comparisons derived (ties and all-bad give none).")
    shown_order_unchanged: bool = Field(description="The ranking equals the order shown, with no ties.")
    next_task: TaskOut | None = Field(
        None,
        description="Only with `?next=true`: the task to work on now (null when none is left), saving "
        "the GET /api/tasks/next round trip.",
    )


# ---------------------------------------------------------------- prompt sets


class RowErrorOut(BaseModel):
    line: int
    unit: Literal["line", "row"]
    message: str


class PromptSetOut(BaseModel):
    id: int
    name: str
    description: str
    eval_fraction: float
    split_seed: int
    prompts: int
    train: int
    eval: int
    created_at: datetime


class PromptSetImportOut(BaseModel):
    prompt_set: PromptSetOut
    created: int = Field(description="Prompts stored.")
    duplicates: int = Field(description="Rows dropped because an earlier row had the same content.")
    errors: list[RowErrorOut] = Field(description="Rows left out (only with skip_invalid).")


class PromptSetErrorOut(BaseModel):
    detail: str
    errors: list[RowErrorOut] = []
