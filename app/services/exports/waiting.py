"""Where a waiting export stands: its place in line and a rough estimate of when it is done.

Exports run on the default queue, oldest first, in workers of their own (never behind training).
The estimate comes from the exports that finished recently: their median duration, times the
exports ahead and this one, less what the running ones have done already. With no finished export
to learn from there is no estimate, rather than a made-up one.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import Run

RECENT_EXPORTS = 20  # finished exports the typical duration is taken from


@dataclass(frozen=True)
class ExportWait:
    position: int | None  # 1: the next export to start; None once it runs
    ahead: int  # exports running or queued before this one
    seconds_left: float | None  # until it is done, roughly; None without finished exports to learn from


def typical_export_seconds(db: Session) -> float | None:
    """The median duration of the recent succeeded exports."""
    rows = db.execute(
        select(Run.started_at, Run.finished_at)
        .where(
            Run.kind == "export",
            Run.status == "succeeded",
            Run.started_at.is_not(None),
            Run.finished_at.is_not(None),
        )
        .order_by(Run.id.desc())
        .limit(RECENT_EXPORTS)
    ).all()
    durations = [(finished - started).total_seconds() for started, finished in rows]
    return median(durations) if durations else None


def export_waits(db: Session) -> dict[int, ExportWait]:
    """The wait of every queued or running export, by run id."""
    active = db.execute(
        select(Run.id, Run.status, Run.progress)
        .where(Run.kind == "export", Run.status.in_(("queued", "running")))
        .order_by(Run.id)
    ).all()
    typical = typical_export_seconds(db)
    running = [row for row in active if row.status == "running"]
    queued = [row for row in active if row.status == "queued"]
    waits: dict[int, ExportWait] = {}
    running_left = 0.0
    for row in running:
        left = None if typical is None else typical * (1.0 - min(1.0, row.progress or 0.0))
        running_left += left or 0.0
        waits[row.id] = ExportWait(position=None, ahead=0, seconds_left=left)
    for index, row in enumerate(queued):
        left = None if typical is None else running_left + typical * (index + 1)
        waits[row.id] = ExportWait(position=index + 1, ahead=len(running) + index, seconds_left=left)
    return waits


def describe_wait(wait: ExportWait) -> str:
    """In words, for the research page: "2nd in line, about 4 min"."""
    if wait.seconds_left is None:
        estimate = "no estimate yet"
    elif wait.seconds_left < 60:
        estimate = "under a minute"
    else:
        estimate = f"about {round(wait.seconds_left / 60)} min"
    if wait.position is None:
        return f"{estimate} left" if wait.seconds_left is not None else estimate
    place = "next in line" if wait.position == 1 else f"{_ordinal(wait.position)} in line"
    return (
        f"{place}, {wait.ahead} ahead; done in {estimate}" if wait.ahead else f"{place}; done in {estimate}"
    )


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
