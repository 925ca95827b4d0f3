"""Real Celery workers for tests: subprocesses on the Redis broker and the test's database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


class WorkerProcess:
    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def kill_hard(self) -> None:
        """SIGKILL the worker and its pool children at once, as an OOM killer or a power cut would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def worker_env(settings, redis_url, monkeypatch) -> dict[str, str]:
    """Environment for worker subprocesses: the test's settings, with Redis as broker (flushed first).
    The test process itself switches to the same broker, so what it enqueues reaches the workers."""
    import redis

    from app.config import reset_settings

    monkeypatch.setenv("PREFLOOP_BROKER_URL", redis_url)
    monkeypatch.setenv("PREFLOOP_REDIS_URL", redis_url)
    reset_settings()

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env |= {k: v for k, v in os.environ.items() if k.startswith("PREFLOOP_")}
    env |= {"PREFLOOP_BROKER_URL": redis_url, "PREFLOOP_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture
def celery_worker(worker_env, tmp_path):
    """Factory: start a real worker (`prefloop worker`) and wait until it is ready; all are stopped after."""
    started: list[WorkerProcess] = []

    def start(queues: str = "gpu,default", extra_env: dict[str, str] | None = None) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        command = [sys.executable, "-m", "app.cli", "worker", "--queues", queues, "--concurrency", "1"]
        # Settings the test changed after the fixtures were set up reach the worker too.
        current = {k: v for k, v in os.environ.items() if k.startswith("PREFLOOP_")}
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command,
                env=worker_env | current | (extra_env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
