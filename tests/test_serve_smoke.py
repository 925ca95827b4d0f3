"""`prefloop serve` end to end: web app, Celery worker and beat start, a login works, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import socket
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


def test_serve_runs_the_embedded_stack_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env |= {
        "PREFLOOP_DATA_DIR": str(tmp_path / "data"),
        "PREFLOOP_ENVIRONMENT": "development",
        "PREFLOOP_DEVICE": "cpu",
        "PREFLOOP_POLICY_POLL_SECONDS": "1",
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
                if response.status_code == 200 and body.get("served_policy_version") == 0:
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
        assert worker_pids, "the Celery worker subprocess is not running"

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
