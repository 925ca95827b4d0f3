"""A run's logged metrics as series by name, the shape both the admin charts and the JSON API serve."""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import RunMetric

Series = dict[str, list[list[float | None]]]


def metric_series(db: Session, run_id: int) -> Series:
    """name → [[step, value], ...] in step order; non-finite values become gaps (JSON has no NaN)."""
    series: Series = {}
    rows = db.execute(
        select(RunMetric.name, RunMetric.step, RunMetric.value)
        .where(RunMetric.run_id == run_id)
        .order_by(RunMetric.name, RunMetric.step)
    )
    for name, step, value in rows:
        series.setdefault(name, []).append([step, value if math.isfinite(value) else None])
    return series
