"""`prefloop demo-loop`'s embedded stack runs the default queue in a worker of its own, beside training."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest

from app.cli.demo_loop import EmbeddedStack
from app.config import get_settings, reset_settings
from app.data.db import session_factory
from app.services.worker_status import read_workers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the embedded default
def test_the_demo_stack_runs_a_worker_per_queue(settings, engine, monkeypatch):
    monkeypatch.setenv("PREFLOOP_WORKER_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("PREFLOOP_WORKER_STATUS_CACHE_SECONDS", "0")
    reset_settings()
    with EmbeddedStack(get_settings()) as stack:
        deadline = time.monotonic() + 120
        workers = []
        while time.monotonic() < deadline:
            with session_factory(engine)() as db:
                workers = [w for w in read_workers(db, timedelta(seconds=5)) if w.alive]
            if len(workers) == 2:
                break
            time.sleep(0.5)
        assert sorted(w.queues for w in workers) == [("default",), ("gpu",)], workers
        assert len({w.pid for w in workers}) == 2  # an export never waits behind a round
        assert httpx.get(f"{stack.url}/healthz", timeout=10).json()["workers"]["alive"] == 2
    with session_factory(engine)() as db:
        assert read_workers(db, timedelta(seconds=5)) == []  # stopped cleanly, they said goodbye
