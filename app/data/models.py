"""ORM tables. Constraints here hold the invariants; application code relies on them.

Invariants and where they live:
- a submission is idempotent / an annotator never sees a task twice: unique (task, user) on
  assignments and annotations;
- a task never gets more annotations than it asks for: check annotation_count <= required_annotations;
- exactly one live policy: policy_alias has one row (name = 'live' is its primary key and checked);
- one round at a time: rounds.active is TRUE only for the running round and is unique (NULLs repeat);
- a policy row exists only for a complete checkpoint: rows are inserted after the atomic rename (registry.py).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.data.db import Base

JSONType = JSON().with_variant(JSONB(), "postgresql")

ROLES = ("annotator", "admin", "researcher")
SPLITS = ("train", "eval")
POLICY_KINDS = ("base", "ppo", "dpo")
POLICY_STATUSES = ("candidate", "approved", "rejected", "retired")
TASK_KINDS = ("rank", "arena")
TASK_STATUSES = ("open", "done", "closed")
# released: the annotator gave the task back unjudged; like skipped it counts as seen, so the task
# goes to someone else, but no annotation is stored.
ASSIGNMENT_STATUSES = ("active", "submitted", "skipped", "expired", "released")
RUN_KINDS = ("reward", "judge", "ppo", "dpo", "evaluate", "generate", "export")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ROUND_STATUSES = (
    "queued",
    "running",
    "awaiting_votes",
    "awaiting_approval",
    "succeeded",
    "failed",
    "cancelled",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


def Timestamp(**kw: Any) -> Mapped[datetime]:  # noqa: N802 - reads like a column type
    return mapped_column(DateTime(timezone=True), default=utcnow, **kw)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(255))
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Bumped on logout so every signed session cookie issued before becomes invalid.
    session_generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = Timestamp()


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = Timestamp()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # After this moment the token is refused (401 naming the date). NULL: issued before tokens
    # expired; such tokens live until revoked, and the token list shows them as "never".
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship()


class AuditEntry(Base):
    """Who did what to which account, and when: account management leaves a row here, never edited.

    The actor and target names are copied in, so the record still reads after an account is renamed
    or deleted; the CLI acts as `cli:<os user>` with no actor id.
    """

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target_user_id_id", "target_user_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = Timestamp()
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(32))
    target_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    target: Mapped[str] = mapped_column(String(100), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class AnnotatorProgress(Base):
    """How many judgements (skips not counted) an annotator has made: in all, and on their latest day.

    A database trigger on `annotations` keeps it (migration 0014), so the annotation page reads one
    row by key after every submit, whatever the length of the annotator's history.
    """

    __tablename__ = "annotator_progress"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    judged_total: Mapped[int] = mapped_column(Integer, default=0)
    judged_day: Mapped[date] = mapped_column(Date)  # UTC day of the latest judgement
    judged_on_day: Mapped[int] = mapped_column(Integer, default=0)  # judgements on judged_day


class AppSetting(Base):
    """Small editable texts and switches (e.g. the annotation guidelines in Markdown)."""

    __tablename__ = "app_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = Timestamp(onupdate=utcnow)


class PromptSet(Base):
    __tablename__ = "prompt_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    eval_fraction: Mapped[float] = mapped_column(Float, default=0.1)
    split_seed: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = Timestamp()


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("prompt_set_id", "content_hash"),
        CheckConstraint(_in("split", SPLITS), name="split"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(64))
    messages: Mapped[list[dict[str, str]]] = mapped_column(JSONType)
    text: Mapped[str] = mapped_column(Text)  # the last user turn, for display and search
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    split: Mapped[str] = mapped_column(String(8), default="train")
    created_at: Mapped[datetime] = Timestamp()

    prompt_set: Mapped[PromptSet] = relationship()


class Policy(Base):
    """A registered policy version: a complete checkpoint folder under registry/policies/<version>/."""

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint(_in("kind", POLICY_KINDS), name="kind"),
        CheckConstraint(_in("status", POLICY_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    # use_alter: policies, rounds and reward_models refer to each other, so these two keys are
    # added after all three tables exist.
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL", use_alter=True))
    reward_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("reward_models.id", ondelete="SET NULL", use_alter=True)
    )
    comparison_snapshot: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="approved")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    source: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = Timestamp()

    parent: Mapped[Policy | None] = relationship(remote_side="Policy.id", foreign_keys=[parent_id])


class PolicyAlias(Base):
    """Exactly one row: the live policy. Moving it is one UPDATE inside the publishing transaction."""

    __tablename__ = "policy_alias"
    __table_args__ = (CheckConstraint("name = 'live'", name="only_live"),)

    name: Mapped[str] = mapped_column(String(16), primary_key=True, default="live")
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="RESTRICT"))
    previous_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = Timestamp(onupdate=utcnow)

    policy: Mapped[Policy] = relationship(foreign_keys=[policy_id])


class RewardModel(Base):
    __tablename__ = "reward_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    base_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    comparison_snapshot: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = Timestamp()


class Response(Base):
    __tablename__ = "responses"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"), index=True)
    text: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    ended_with_eos: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = Timestamp()

    prompt: Mapped[Prompt] = relationship()
    policy: Mapped[Policy | None] = relationship()


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("kind", TASK_KINDS), name="kind"),
        CheckConstraint(_in("status", TASK_STATUSES), name="status"),
        CheckConstraint("required_annotations >= 1", name="required_positive"),
        CheckConstraint("annotation_count <= required_annotations", name="not_overfilled"),
        # Slots handed out (active + submitted assignments) never exceed what the task asks for.
        CheckConstraint(
            "claimed_count >= 0 AND claimed_count <= required_annotations", name="claims_in_range"
        ),
        Index("ix_tasks_status_id", "status", "id"),
        # Only tasks with a free slot: the assignment query walks this index in id order.
        Index(
            "ix_tasks_claimable",
            "id",
            postgresql_where=text("status = 'open' AND claimed_count < required_annotations"),
            sqlite_where=text("status = 'open' AND claimed_count < required_annotations"),
        ),
        # The few open gold tasks, for the gold draw (without it, that query reads every open task).
        Index(
            "ix_tasks_gold_open",
            "id",
            postgresql_where=text("is_gold = true AND status = 'open'"),
            sqlite_where=text("is_gold = true AND status = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8), default="rank")
    status: Mapped[str] = mapped_column(String(8), default="open")
    required_annotations: Mapped[int] = mapped_column(Integer, default=1)
    annotation_count: Mapped[int] = mapped_column(Integer, default=0)
    # Slots taken by active or submitted assignments; changed only by a conditional UPDATE on this row,
    # which is what keeps concurrent annotators from taking the same slot (app/services/assignment.py).
    claimed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = Timestamp()

    prompt: Mapped[Prompt] = relationship()
    items: Mapped[list[TaskResponse]] = relationship(
        order_by="TaskResponse.position", cascade="all, delete-orphan", back_populates="task"
    )


class TaskResponse(Base):
    """The responses of a task in the order they are shown (shuffled once at creation)."""

    __tablename__ = "task_responses"
    __table_args__ = (UniqueConstraint("task_id", "response_id"),)

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))

    task: Mapped[Task] = relationship(back_populates="items")
    response: Mapped[Response] = relationship()


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "user_id"),
        CheckConstraint(_in("status", ASSIGNMENT_STATUSES), name="status"),
        Index("ix_assignments_status_expires_at", "status", "expires_at"),
        # The task an annotator holds right now: read on every page load and next-task call, and
        # without it found among everything the annotator ever did.
        Index(
            "ix_assignments_active_user",
            "user_id",
            "id",
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(10), default="active")
    created_at: Mapped[datetime] = Timestamp()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Annotation(Base):
    """One annotator's judgement of one task: the full ranking best→worst as tie groups of response ids."""

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    ranking: Mapped[list[list[int]]] = mapped_column(JSONType, default=list)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_reason: Mapped[str] = mapped_column(Text, default="")
    flags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    rationale: Mapped[str] = mapped_column(Text, default="")
    time_spent_ms: Mapped[int] = mapped_column(Integer, default=0)
    shown_order_unchanged: Mapped[bool] = mapped_column(Boolean, default=False)
    payload_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = Timestamp(index=True)
    # How often the annotator revised it (0: as first submitted); earlier versions are in
    # annotation_revisions, the row itself always holds the latest.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    revised_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AnnotationRevision(Base):
    """A version of a judgement its annotator replaced: what the annotation said before revision
    `revision + 1`. The annotation row and its comparisons hold the latest version."""

    __tablename__ = "annotation_revisions"
    __table_args__ = (UniqueConstraint("annotation_id", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    ranking: Mapped[list[list[int]]] = mapped_column(JSONType, default=list)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    rationale: Mapped[str] = mapped_column(Text, default="")
    time_spent_ms: Mapped[int] = mapped_column(Integer, default=0)
    shown_order_unchanged: Mapped[bool] = mapped_column(Boolean, default=False)
    payload_hash: Mapped[str] = mapped_column(String(64))
    made_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # when this version was submitted
    replaced_at: Mapped[datetime] = Timestamp()


class Comparison(Base):
    """A pairwise preference derived from an annotation (ties give none)."""

    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("annotation_id", "chosen_response_id", "rejected_response_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # Looked up by annotation through the unique index above (annotation_id leads it); a second
    # index on the column alone would only cost an insert per comparison.
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    chosen_response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    rejected_response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    margin: Mapped[float] = mapped_column(Float, default=1.0)
    created_at: Mapped[datetime] = Timestamp()


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        CheckConstraint(_in("status", ROUND_STATUSES), name="status"),
        CheckConstraint(_in("algorithm", ("ppo", "dpo")), name="algorithm"),
        # TRUE for the one round in progress, NULL otherwise; unique, so a second cannot start.
        CheckConstraint("active IS NULL OR active", name="active_true_or_null"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(8), default="ppo")
    status: Mapped[str] = mapped_column(String(20), default="queued")
    active: Mapped[bool | None] = mapped_column(Boolean, unique=True, default=True)
    stage: Mapped[str] = mapped_column(String(32), default="queued")
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    started_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    trigger: Mapped[str] = mapped_column(String(16), default="manual")
    base_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    comparison_snapshot: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = Timestamp()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When maintenance last sent its task again; NULL: sent once, when the row was created.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The promotion gate's verdict: its figures, checks and reasons (the held-out judge), and in
    # human mode the arena votes and their Bradley-Terry interval; what the admin reads.
    gate: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, server_default="{}")


class Run(Base):
    """One unit of GPU or background work. The row, not Celery's result backend, holds its state."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        Index("ix_runs_status_kind", "status", "kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = Timestamp()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its task was last sent again (maintenance, a stale run re-queued); NULL: at creation.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunMetric(Base):
    __tablename__ = "run_metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class RoundAnnotation(Base):
    """The annotations whose comparisons a round trained on, recorded when the round reads its data.

    Exclusion of flagged annotators is decided at that moment, so this table is what makes a
    round's training data reproducible after flags change.
    """

    __tablename__ = "round_annotations"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    annotation_id: Mapped[int] = mapped_column(
        ForeignKey("annotations.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class WorkerHeartbeat(Base):
    """One row per running Celery worker process, touched every few seconds; an old `beat_at` means
    the worker died without saying goodbye."""

    __tablename__ = "worker_heartbeats"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(255), default="")  # comma-separated
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
