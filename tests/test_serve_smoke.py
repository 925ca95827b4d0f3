"""`prefloop serve` end to end: web app, the gpu and default workers and beat start, a login works, a
worker killed by SIGKILL is started again, Ctrl-C stops all; workers that keep dying make it exit 1."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _worker_pids(database: Path) -> dict[str, int]:
    """Queues → pid of the worker alive for them, from the workers' heartbeats."""
    if not database.exists():
        return {}
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT queues, pid FROM worker_heartbeats WHERE beat_at > datetime('now', '-3 seconds')"
        ).fetchall()
    return dict(rows)


def _wait(condition, timeout: float, what: str, server: subprocess.Popen, log_path: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert server.poll() is None, log_path.read_text()
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()}")


def test_serve_runs_the_embedded_stack_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env |= {
        "PREFLOOP_DATA_DIR": str(tmp_path / "data"),
        "PREFLOOP_ENVIRONMENT": "development",
        "PREFLOOP_DEVICE": "cpu",
        "PREFLOOP_POLICY_POLL_SECONDS": "1",
        "PREFLOOP_WORKER_HEARTBEAT_SECONDS": "1",
        "PREFLOOP_WORKER_STALE_SECONDS": "3",
        "PREFLOOP_WORKER_STATUS_CACHE_SECONDS": "0",
        "PREFLOOP_WORKER_RESTART_BACKOFF_SECONDS": "0.5",
    }
    prefloop = [sys.executable, "-m", "app.cli"]
    init = subprocess.run(
        [*prefloop, "init", "--demo", "--base-model", str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stderr + init.stdout

    port = _free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*prefloop, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        body = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{base}/healthz", timeout=5)
                body = response.json()
                if body.get("status") == "ok" and body.get("served_policy_version") == 0:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log_path.read_text()
            time.sleep(1)
        assert body and body["status"] == "ok" and body["served_policy_version"] == 0, (
            body,
            log_path.read_text(),
        )
        output = log_path.read_text()
        assert base in output and "annotator / annotator-demo" in output
        worker_pids = _children_of(server.pid)
        assert len(worker_pids) == 2, "the gpu and the default worker subprocesses are not running"
        database = tmp_path / "data" / "prefloop.db"
        # Training and exports never share a worker: each queue has a process of its own.
        pids = _wait(
            lambda: len(_worker_pids(database)) == 2 and _worker_pids(database),
            60,
            "both workers",
            server,
            log_path,
        )
        assert pids.keys() == {"gpu", "default"} and set(pids.values()) == set(worker_pids)

        os.killpg(pids["gpu"], signal.SIGKILL)  # the worker and its pool children, as the OOM killer would
        restarted = _wait(
            lambda: _worker_pids(database).get("gpu") not in (None, pids["gpu"]) and _worker_pids(database),
            90,
            "the gpu worker to be started again",
            server,
            log_path,
        )
        assert restarted["default"] == pids["default"]  # the other worker was left alone
        assert "the gpu worker exited with code -9" in log_path.read_text()
        assert httpx.get(f"{base}/healthz", timeout=5).json()["workers"]["queues"]["gpu"]["workers"] == 1
        worker_pids = _children_of(server.pid)

        with httpx.Client(base_url=base, follow_redirects=False) as browser:
            browser.get("/login")
            csrf = browser.cookies["prefloop_csrf"]
            login = browser.post(
                "/login", data={"username": "annotator", "password": "annotator-demo", "csrf_token": csrf}
            )
            assert login.status_code == 303 and login.headers["location"] == "/annotate"
            assert "prefloop_session" in browser.cookies
    finally:
        server.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, log_path.read_text()
    assert "prefloop stopped" in log_path.read_text()
    for pid in worker_pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def test_serve_exits_non_zero_when_its_workers_keep_dying(tmp_path: Path):
    """A worker that cannot start (here: a broker URL no transport understands) dies again after
    each restart; serve gives up after a few quick deaths and exits 1 so a process manager takes over."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env |= {
        "PREFLOOP_DATA_DIR": str(tmp_path / "data"),
        "PREFLOOP_ENVIRONMENT": "development",
        "PREFLOOP_SERVE_POLICY": "false",
        "PREFLOOP_BROKER_URL": "nosuch://nowhere",
        "PREFLOOP_WORKER_RESTART_BACKOFF_SECONDS": "0.2",
        "PREFLOOP_WORKER_MAX_FAST_FAILURES": "2",
    }
    serve = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(_free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = serve.stdout + serve.stderr
    assert serve.returncode == 1, output
    assert "died 3 times in a row" in output and "giving up so that a process manager can restart" in output
    assert "prefloop stopped" in output
