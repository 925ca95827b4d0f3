"""The annotation statements: every one is there for both databases, no SQL file lies unused, and the
claim keeps the plan its performance depends on."""

from __future__ import annotations

import inspect

import pytest

from app.data.db import run_in_autocommit
from app.data.models import TASK_KINDS, utcnow
from app.data.statements import Statement, sqlite_runner
from app.data.statements.postgres_runner import SQL_DIR as POSTGRES_DIR
from app.data.statements.postgres_runner import statement_sql


def test_every_statement_has_its_postgres_file_and_its_sqlite_steps():
    assert {path.stem for path in POSTGRES_DIR.glob("*.sql")} == {str(s) for s in Statement}
    reads, writes = set(sqlite_runner.READS), set(sqlite_runner.WRITES)
    assert reads | writes == set(Statement) and not reads & writes


def test_every_sqlite_step_file_is_used():
    source = inspect.getsource(sqlite_runner)
    unused = [path.stem for path in sqlite_runner.SQL_DIR.glob("*.sql") if f'"{path.stem}"' not in source]
    assert unused == []


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_claim_probes_each_candidate_instead_of_anti_joining_every_assignment(engine):
    """OFFSET 0 in next_task.sql keeps the unseen-task check a per-candidate index probe: as an anti
    join it reads every assignment of the table, and claims slow down as annotations pile up."""
    now = utcnow()
    params = {"user_id": 1, "kinds": list(TASK_KINDS), "now": now, "expires_at": now, "floor": 0}
    explain = "EXPLAIN " + statement_sql(Statement.NEXT_TASK)
    plan = "\n".join(row[0] for row in run_in_autocommit(engine, explain, params))
    assert "SubPlan" in plan and "Anti Join" not in plan, plan
