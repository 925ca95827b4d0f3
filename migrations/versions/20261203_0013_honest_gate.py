"""rounds record their gate's verdict; a judge run kind; rounds can wait for arena votes

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 12:00:00.000000

The promotion gate judges a candidate with a reward model held out from the policy's training (a
run of kind `judge`) and writes its figures, checks and reasons on the round (`rounds.gate`), where
the admin console and the API read them. In human mode a candidate that passed the checks goes into
blind arena tasks against the live policy and the round waits for the votes (`awaiting_votes`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

RUN_KINDS_BEFORE = ("reward", "ppo", "dpo", "evaluate", "generate", "export")
RUN_KINDS_AFTER = ("reward", "judge", "ppo", "dpo", "evaluate", "generate", "export")
ROUND_STATUSES_BEFORE = ("queued", "running", "awaiting_approval", "succeeded", "failed", "cancelled")
ROUND_STATUSES_AFTER = (
    "queued",
    "running",
    "awaiting_votes",
    "awaiting_approval",
    "succeeded",
    "failed",
    "cancelled",
)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _constraints(run_kinds: tuple[str, ...], round_statuses: tuple[str, ...]) -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", run_kinds))
    with op.batch_alter_table("rounds") as batch:
        batch.drop_constraint(op.f("ck_rounds_status"), type_="check")
        batch.create_check_constraint("status", _in("status", round_statuses))


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("gate", JSON, server_default="{}", nullable=False))
    _constraints(RUN_KINDS_AFTER, ROUND_STATUSES_AFTER)


def downgrade() -> None:
    # Rows of the new kinds and statuses have no place in the old schema.
    op.execute(
        "UPDATE rounds SET status = 'failed', stage = 'failed', active = NULL WHERE status = 'awaiting_votes'"
    )
    op.execute("DELETE FROM runs WHERE kind = 'judge'")
    _constraints(RUN_KINDS_BEFORE, ROUND_STATUSES_BEFORE)
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("gate")
