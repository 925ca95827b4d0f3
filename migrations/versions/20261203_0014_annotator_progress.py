"""annotator_progress: each annotator's judgement counts, kept by a trigger on annotations

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 12:00:00.000000

The annotation page shows an annotator's judgements today and in total after every submit. Counted
from `annotations`, that read grew with the annotator's history; a row per annotator, kept by an
insert trigger (so the Postgres submit function, the SQLite steps and any other writer count alike),
makes it one lookup by key. Skips are not judgements and are not counted. The upgrade fills the
rows from the annotations already stored.
"""

from collections.abc import Sequence
from datetime import UTC, datetime, time

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSTGRES_TRIGGER = """
CREATE FUNCTION prefloop_count_judgement() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    day date := (NEW.created_at AT TIME ZONE 'UTC')::date;
BEGIN
    INSERT INTO annotator_progress AS p (user_id, judged_total, judged_day, judged_on_day)
    VALUES (NEW.user_id, 1, day, 1)
    ON CONFLICT (user_id) DO UPDATE SET
        judged_total = p.judged_total + 1,
        judged_on_day = CASE WHEN p.judged_day = EXCLUDED.judged_day THEN p.judged_on_day + 1
                             WHEN p.judged_day > EXCLUDED.judged_day THEN p.judged_on_day ELSE 1 END,
        judged_day = GREATEST(p.judged_day, EXCLUDED.judged_day);
    RETURN NULL;
END $$;
CREATE TRIGGER annotations_count_judgement AFTER INSERT ON annotations
    FOR EACH ROW WHEN (NOT NEW.skipped) EXECUTE FUNCTION prefloop_count_judgement();
"""

# SQLite stores times as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC; date() reads the day off it.
SQLITE_TRIGGER = """
CREATE TRIGGER annotations_count_judgement AFTER INSERT ON annotations
WHEN NOT NEW.skipped
BEGIN
    INSERT INTO annotator_progress (user_id, judged_total, judged_day, judged_on_day)
    VALUES (NEW.user_id, 1, date(NEW.created_at), 1)
    ON CONFLICT (user_id) DO UPDATE SET
        judged_total = judged_total + 1,
        judged_on_day = CASE WHEN judged_day = excluded.judged_day THEN judged_on_day + 1
                             WHEN judged_day > excluded.judged_day THEN judged_on_day ELSE 1 END,
        judged_day = max(judged_day, excluded.judged_day);
END
"""


def upgrade() -> None:
    op.create_table(
        "annotator_progress",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("judged_total", sa.Integer(), nullable=False),
        sa.Column("judged_day", sa.Date(), nullable=False),
        sa.Column("judged_on_day", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_annotator_progress_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_annotator_progress")),
    )
    bind = op.get_bind()
    today = datetime.now(UTC).date()
    start_of_day = datetime.combine(today, time.min, tzinfo=UTC)
    progress = sa.table(
        "annotator_progress",
        sa.column("user_id"),
        sa.column("judged_total"),
        sa.column("judged_day", sa.Date()),
        sa.column("judged_on_day"),
    )
    annotations = sa.table(
        "annotations",
        sa.column("user_id"),
        sa.column("skipped", sa.Boolean()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    counted = (
        sa.select(
            annotations.c.user_id,
            sa.func.count(),
            sa.literal(today, sa.Date()),
            sa.func.coalesce(sa.func.sum(sa.case((annotations.c.created_at >= start_of_day, 1), else_=0)), 0),
        )
        .where(annotations.c.skipped == sa.false())
        .group_by(annotations.c.user_id)
    )
    bind.execute(
        progress.insert().from_select(["user_id", "judged_total", "judged_day", "judged_on_day"], counted)
    )
    op.execute(POSTGRES_TRIGGER if bind.dialect.name == "postgresql" else SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER annotations_count_judgement ON annotations")
        op.execute("DROP FUNCTION prefloop_count_judgement()")
    else:
        op.execute("DROP TRIGGER annotations_count_judgement")
    op.drop_table("annotator_progress")
