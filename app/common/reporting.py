"""How a trainer talks to the outside world without knowing about databases or Celery.

Trainers take a `Reporter`; `app/services/runs.py` implements it over the runs/run_metrics tables,
tests and benchmarks use `MemoryReporter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class RunCancelled(Exception):
    """Raised inside a trainer when its reporter says the run was cancelled."""


class Reporter(Protocol):
    def progress(self, done: int, total: int, message: str = "") -> None:
        """Where the run stands; implementations throttle writes."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Scalar metrics for one step. Called once per step and name; must be idempotent per (step, name)."""

    def should_stop(self) -> bool:
        """True when the run was cancelled; the trainer then raises RunCancelled at a safe point."""


@dataclass
class MemoryReporter:
    """Keeps everything in lists; for tests and benchmarks."""

    progress_log: list[tuple[int, int, str]] = field(default_factory=list)
    rows: dict[tuple[int, str], float] = field(default_factory=dict)
    stop: bool = False

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.progress_log.append((done, total, message))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows[(step, name)] = float(value)

    def should_stop(self) -> bool:
        return self.stop

    def series(self, name: str) -> list[float]:
        """Values of one metric ordered by step."""
        return [v for (s, n), v in sorted(self.rows.items()) if n == name]
