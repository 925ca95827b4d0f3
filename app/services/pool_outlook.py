"""What an annotator facing an empty pool should know: is work on its way, and how much.

Read by the annotation page when it has no task to show; the page polls while it shows this, faster
while a generation run is writing the tasks that are coming.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import Run, Task


@dataclass(frozen=True)
class PoolOutlook:
    generating_runs: int  # generation runs queued or running
    running: bool  # at least one of them is running (not only queued)
    tasks_coming: int  # prompts those runs write responses for: one task each
    progress: float  # the running runs' mean progress, 0..1
    held_by_others: int  # open tasks whose every slot is taken (they come back when unanswered)

    @property
    def generating(self) -> bool:
        return self.generating_runs > 0


def pool_outlook(db: Session) -> PoolOutlook:
    runs = db.execute(
        select(Run.status, Run.config, Run.progress).where(
            Run.kind == "generate", Run.status.in_(("queued", "running"))
        )
    ).all()
    coming = sum(
        len((run.config or {}).get("prompt_ids") or [])
        + len((run.config or {}).get("arena_prompt_ids") or [])
        for run in runs
    )
    running = [run for run in runs if run.status == "running"]
    progress = sum(float(run.progress or 0.0) for run in running) / len(running) if running else 0.0
    held = (
        db.scalar(
            select(func.count(Task.id)).where(
                Task.status == "open",
                Task.is_gold.is_(False),
                Task.claimed_count >= Task.required_annotations,
            )
        )
        or 0
    )
    return PoolOutlook(
        generating_runs=len(runs),
        running=bool(running),
        tasks_coming=coming,
        progress=min(max(progress, 0.0), 1.0),
        held_by_others=int(held),
    )
