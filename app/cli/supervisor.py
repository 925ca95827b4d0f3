"""Keeping the embedded stack's worker processes running (`prefloop serve`, `prefloop demo-loop`).

A worker that dies (SIGKILL, the OOM killer, a crash) is started again after a wait that doubles
with each death in a row (PREFLOOP_WORKER_RESTART_BACKOFF_SECONDS, up to …_MAX_SECONDS). A worker
that keeps dying soon after its start (PREFLOOP_WORKER_FAST_FAILURE_SECONDS) is broken rather than
unlucky: after PREFLOOP_WORKER_MAX_FAST_FAILURES such deaths in a row the supervisor stops every
worker, says why, and calls `on_give_up`, so `prefloop serve` exits non-zero and a process manager
(systemd, Docker's restart policy) or a person takes over.

Each worker runs in a session of its own, so it and its pool children are one process group: a dead
worker's leftovers are killed with it, and Ctrl-C in the terminal reaches only the supervisor, which
stops the workers cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from app.config import Settings

log = logging.getLogger("prefloop.supervisor")


@dataclass
class Backoff:
    """When to restart and when to give up, from the PREFLOOP_WORKER_* settings."""

    first_delay: float = 1.0
    max_delay: float = 60.0
    fast_failure_seconds: float = 60.0
    max_fast_failures: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        return cls(
            first_delay=settings.worker_restart_backoff_seconds,
            max_delay=settings.worker_restart_backoff_max_seconds,
            fast_failure_seconds=settings.worker_fast_failure_seconds,
            max_fast_failures=settings.worker_max_fast_failures,
        )

    def delay(self, failures_in_a_row: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** max(0, failures_in_a_row - 1))


@dataclass
class Child:
    """One supervised process: its name (for messages), command line and current process."""

    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    fast_failures: int = 0  # deaths in a row, each soon after its start
    restarts: int = 0
    restart_at: float | None = None  # when a dead one is due to start again
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """`with Supervisor({"gpu worker": [...], ...}, backoff) as workers:` keeps them running."""

    def __init__(
        self,
        commands: dict[str, list[str]],
        backoff: Backoff,
        *,
        on_give_up: Callable[[str], None] | None = None,
        output: IO | int | None = None,
        poll_seconds: float = 0.5,
    ):
        self.children = [Child(name, command) for name, command in commands.items()]
        self.backoff = backoff
        self.gave_up: str | None = None  # why, once the supervisor gave up
        self._on_give_up = on_give_up
        self._output = output
        self._poll = poll_seconds
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Supervisor:
        for child in self.children:
            self._spawn(child)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop watching, then stop every worker: a warm shutdown first, SIGKILL after `timeout`."""
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            stop_children([c.process for c in self.children if c.process is not None], timeout)

    @property
    def pids(self) -> dict[str, int | None]:
        return {
            c.name: (c.process.pid if c.process and c.process.poll() is None else None) for c in self.children
        }

    # ------------------------------------------------------------ watching

    def _spawn(self, child: Child) -> None:
        stream = self._output if self._output is not None else None
        child.process = subprocess.Popen(
            child.command, start_new_session=True, stdout=stream, stderr=subprocess.STDOUT if stream else None
        )
        child.started_at = time.monotonic()
        child.restart_at = None

    def _watch(self) -> None:
        while not self._stopping.wait(self._poll):
            with self._lock:
                if self._stopping.is_set():
                    return
                for child in self.children:
                    reason = self._check(child)
                    if reason is not None:
                        self._give_up(reason)
                        return

    def _check(self, child: Child) -> str | None:
        """Restart a dead child when due; the reason to give up when it keeps dying."""
        now = time.monotonic()
        process = child.process
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                log.warning("starting the %s again (restart %d)", child.name, child.restarts)
                self._spawn(child)
            return None
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        child.exits.append(code)
        _kill_group(process.pid)  # pool children left behind by a killed main process
        lived = now - child.started_at
        child.fast_failures = child.fast_failures + 1 if lived < self.backoff.fast_failure_seconds else 1
        if child.fast_failures > self.backoff.max_fast_failures:
            return (
                f"the {child.name} died {child.fast_failures} times in a row, each within "
                f"{self.backoff.fast_failure_seconds:.0f}s of its start (last exit code {code}); giving up so "
                "that a process manager can restart prefloop. Look at the worker's log above for the cause."
            )
        delay = self.backoff.delay(child.fast_failures)
        log.warning(
            "the %s exited with code %s after %.0fs; starting it again in %.0fs (death %d in a row, "
            "giving up after %d quick ones)",
            child.name,
            code,
            lived,
            delay,
            child.fast_failures,
            self.backoff.max_fast_failures,
        )
        child.restart_at = now + delay
        return None

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        log.error(reason)
        self._stopping.set()
        stop_children([c.process for c in self.children if c.process is not None])
        if self._on_give_up is not None:
            self._on_give_up(reason)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop_children(children: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """Stop child processes: a warm shutdown first, then SIGKILL to their process group after `timeout`."""
    for child in children:
        if child.poll() is None:
            child.terminate()  # Celery's warm shutdown: the current task finishes or is redelivered
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            child.wait()


def exit_once_on_sigterm(signum: int, _frame: object) -> None:
    """A SIGTERM handler that unwinds like an exception, so `finally` and `with` blocks stop children.

    Once: a second request (a parent passing its own on) must not cut that shutdown short.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)
