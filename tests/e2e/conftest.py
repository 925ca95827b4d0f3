"""Browser tests: a real uvicorn server (subprocess, SQLite file, free port on 127.0.0.1) driven by
Debian's Chromium through Playwright. Tasks are seeded straight into the database; no model needed.

Chromium missing → the tests skip through service_unavailable (fail under PREFLOOP_REQUIRE_SERVICES=1).
Screenshots go to test-artifacts/e2e/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.conftest import service_unavailable

CHROMIUM = os.environ.get("PREFLOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"
PASSWORD = "e2e-password-123"
# Everything a test seeds; wiped before each test so every test starts from an empty pool.
SEEDED_TABLES = (
    "comparisons",
    "annotations",
    "assignments",
    "task_responses",
    "tasks",
    "responses",
    "prompts",
    "prompt_sets",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    engine: Engine
    process: subprocess.Popen


@pytest.fixture(scope="session")
def live_server(sqlite_template, tmp_path_factory) -> Iterator[LiveServer]:
    from app.data.db import make_engine

    data_dir = tmp_path_factory.mktemp("e2e-data")
    db_path = data_dir / "prefloop.db"
    shutil.copy(sqlite_template, db_path)
    port = _free_port()
    env = {
        **os.environ,
        "PREFLOOP_ENVIRONMENT": "test",
        "PREFLOOP_DATA_DIR": str(data_dir),
        "PREFLOOP_DATABASE_URL": f"sqlite:///{db_path}",
        "PREFLOOP_SECRET_KEY": "e2e-secret-key-that-is-long-enough-0123456789",
        "PREFLOOP_SERVE_POLICY": "false",
        "PREFLOOP_GOLD_SHARE": "0",
        # Every browser test logs in from 127.0.0.1: the whole suite is one busy office.
        "PREFLOOP_LOGIN_RATE_LIMIT_PER_IP": "off",
    }
    for key in ("PREFLOOP_BROKER_URL", "PREFLOOP_REDIS_URL"):
        env.pop(key, None)
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - the server writes to it until teardown
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.web.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/login", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start: {(data_dir / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    engine = make_engine(f"sqlite:///{db_path}")
    try:
        yield LiveServer(url=url, engine=engine, process=process)
    finally:
        engine.dispose()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def server(live_server) -> LiveServer:
    """The live server with an empty task pool."""
    with live_server.engine.begin() as conn:
        for table in SEEDED_TABLES:
            conn.execute(text(f"DELETE FROM {table}"))
    return live_server


@pytest.fixture
def server_db(server):
    from app.data.db import session_factory

    session = session_factory(server.engine)()
    yield session
    session.close()


@pytest.fixture
def annotator(server_db):
    """A fresh annotator account; returns its username."""
    from app.data.models import User
    from app.services.accounts import hash_password

    user = User(
        username=f"ann-{uuid.uuid4().hex[:8]}", role="annotator", password_hash=hash_password(PASSWORD)
    )
    server_db.add(user)
    server_db.commit()
    return user


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        service_unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("the playwright Python package is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))  # type: ignore[attr-defined]
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):  # a crashed page must not hide the test's own failure
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-final.png"), full_page=True)
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page, server: LiveServer, username: str) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/annotate")
