"""Schemathesis against the app's own /openapi.json, as an annotator, a researcher and an admin.

A real server (uvicorn subprocess) on a Postgres database of its own, seeded with policies, tasks
and a prompt set so that small generated ids often name real rows. A real server rather than the
ASGI app in-process: the app's lifespan (hot connections, policy holder) opens and closes once, as
in production, HTTP parsing is uvicorn's, and schemathesis's in-process client would keep one
lifespan per app alive until the interpreter exits.

Each operation gets a bounded number of generated cases per role (derandomized, so CI runs the same
cases every time). Every response must be below 500 and conform to the schema: documented status
code, content type, headers and body. The number of cases run is written to
test-artifacts/fuzz/cases.json and printed.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL, service_unavailable
from tests.private_services import AppServer, start_app_server

EXAMPLES_PER_OPERATION = 10
# Schemathesis's own settings: every phase but stateful (examples, coverage of boundary values and
# invalid inputs, random fuzzing), without the coverage phase's requests in methods the schema does not
# list (starlette answers them all with the same 405; they would be a third of the cases).
CONFIG = SchemathesisConfig.from_dict({"phases": {"coverage": {"unexpected-methods": []}}})
ROLES = ("annotator", "researcher", "admin")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "fuzz"
CASES: Counter[str] = Counter()


# Server errors, and the response conformance checks: each answer's status code, content type,
# headers and body are the ones the document gives for that operation.
def no_server_error(ctx, response, case) -> bool | None:
    """not_a_server_error, except the playground's documented 503 on a server that loads no model
    (the fuzz server runs with PREFLOOP_SERVE_POLICY=false; tests/app/web/test_playground.py streams
    from a real one)."""
    if (
        case.operation.path == "/admin/playground/stream"
        and response.status_code == 503
        and "not loaded in this web process" in response.text
    ):
        return True
    return not_a_server_error(ctx, response, case)


RESPONSE_CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _seed(url: str) -> dict[str, str]:
    """Policies v0-v2, judged tasks (so a round can start), open tasks, a finished export and a user
    per role; returns each role's API token."""
    from app.config import get_settings
    from app.data.db import make_engine, session_factory
    from app.data.models import User
    from app.services.accounts import create_api_token
    from app.services.exports import ExportSpec
    from app.services.exports.jobs import create_export_run
    from tests.world import World, marker_preferences
    from workers.runs.export import run_export_job

    engine = make_engine(url, pool_size=2)
    sessions = session_factory(engine)
    db = sessions()
    try:
        world = World(db, get_settings())
        world.policy(2)
        marker_preferences(world, n_prompts=3, eval_prompts=1)
        world.tasks_from_texts(
            [(f"fuzz prompt {i}", [f"fuzz answer {i}.{j}" for j in range(3)]) for i in range(4)], required=3
        )
        tokens = {}
        for role in ROLES:
            user = User(username=f"fuzz-{role}", role=role, password_hash="!")  # token-only account
            db.add(user)
            db.flush()
            tokens[role] = create_api_token(db, user, "fuzz")
        db.commit()
        export = create_export_run(db, ExportSpec(file_format="jsonl"), None)
        assert run_export_job(export.id, sessions) == "succeeded"
        return tokens
    finally:
        db.close()
        engine.dispose()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[tuple[AppServer, dict[str, str]]]:
    from app.config import reset_settings
    from app.data.migrate import run_migrations

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        admin.dispose()
        service_unavailable(f"Postgres is not reachable at {PG_ADMIN_URL}")
    name = f"prefloop_fuzz_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    env = {
        "PREFLOOP_ENVIRONMENT": "test",
        "PREFLOOP_DATA_DIR": str(data_dir),
        "PREFLOOP_DATABASE_URL": url,
        "PREFLOOP_SECRET_KEY": "fuzz-secret-key-that-is-long-enough-0123456789",
        "PREFLOOP_SERVE_POLICY": "false",
        "PREFLOOP_DEVICE": "cpu",
        "PREFLOOP_GC_FREEZE": "false",
    }
    server, server_cpu = None, 0.0
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key in ("PREFLOOP_BROKER_URL", "PREFLOOP_REDIS_URL", "PREFLOOP_BASE_MODEL"):
                patch.delenv(key, raising=False)  # the embedded broker: rounds and exports queue in data_dir
            for key, value in env.items():
                patch.setenv(key, value)
            reset_settings()
            run_migrations(url)
            tokens = _seed(url)
            server = start_app_server(dict(os.environ), data_dir / "server.log")
        # The document fuzzed is the one the server serves.
        assert httpx.get(f"{server.url}/openapi.json").json() == OPENAPI
        reset_settings()
        yield server, tokens
        assert "Traceback" not in server.log(), server.log()[-4000:]
    finally:
        if server is not None:
            server_cpu = _cpu_seconds(server.process.pid)
            server.stop()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "server.log").write_text(server.log())
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        total = sum(CASES.values())
        figures = {"total": total, "by_role": CASES, "server_cpu_seconds": server_cpu}
        (ARTIFACTS / "cases.json").write_text(json.dumps(figures, indent=2))
        print(f"\nschemathesis: {total} cases ({dict(CASES)}), server CPU {server_cpu:.0f} s")


def _app_openapi() -> dict:
    """The app's OpenAPI document, as /openapi.json serves it (built without a database: the routes
    and their models decide it, and the fixture checks the served one is the same)."""
    import tempfile

    from app.config import Settings
    from app.web.main import create_app

    folder = tempfile.mkdtemp(prefix="prefloop-openapi-")
    settings = Settings(data_dir=folder, database_url=f"sqlite:///{folder}/unused.db")
    return create_app(settings).openapi()


OPENAPI = _app_openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


@pytest.mark.parametrize("role", ROLES)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_below_500_and_as_documented(case, role, fuzz_server):
    server, tokens = fuzz_server
    CASES[role] += 1
    case.call_and_validate(
        base_url=server.url, headers={"Authorization": f"Bearer {tokens[role]}"}, checks=RESPONSE_CHECKS
    )
