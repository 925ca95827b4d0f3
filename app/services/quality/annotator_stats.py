"""Per-annotator throughput, time per task, skip/flag rates and suspicious patterns.

Suspicious patterns are shown to admins, never acted on automatically: only gold accuracy
flags an annotator (gold.py). The patterns are cheap signs of clicking through:
- keeping the shown order: by chance this happens 1/K! of the time (4% for K = 4), so it is only
  measured on tasks with three or more responses (with two it is a coin flip);
- sub-second submissions: nobody reads K responses in under a second;
- tying everything: one tie group with every response says nothing.
A time of 0 ms means the client did not report one (API clients may not), so it is left out of
the time figures rather than counted as fast.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import Annotation, TaskResponse, User, utcnow


@dataclass(frozen=True)
class SuspicionRules:
    # Rates over fewer annotations are noise: a new annotator's first few tasks prove nothing.
    min_annotations: int = 10
    # Ten times the chance rate for K = 4; honest annotators agree with a random shuffle rarely.
    unchanged_rate: float = 0.5
    # Under one second nobody has read the prompt, let alone the responses.
    fast_ms: int = 1000
    # A few fast submissions happen (an obvious task, a double click); a fifth of them does not.
    fast_rate: float = 0.2
    # Tying everything now and then is a judgement; half the time it is avoiding the work.
    all_tied_rate: float = 0.5


@dataclass
class AnnotatorStats:
    user_id: int
    username: str
    total: int = 0  # annotations, skips included
    submitted: int = 0  # not skipped
    skipped: int = 0
    flagged: int = 0  # annotations carrying at least one flag
    all_bad: int = 0
    last_24h: int = 0
    last_7d: int = 0
    timed: int = 0  # submissions that reported a time
    median_ms: float | None = None
    per_hour: float | None = None  # submissions per hour of time spent on them
    fast: int = 0
    unchanged: int = 0
    unchanged_eligible: int = 0  # submissions on tasks with >= 3 responses
    all_tied: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    suspicious: list[str] = field(default_factory=list)

    @property
    def skip_rate(self) -> float | None:
        return self.skipped / self.total if self.total else None

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.total if self.total else None

    @property
    def all_bad_rate(self) -> float | None:
        return self.all_bad / self.submitted if self.submitted else None

    @property
    def fast_rate(self) -> float | None:
        return self.fast / self.timed if self.timed else None

    @property
    def unchanged_rate(self) -> float | None:
        return self.unchanged / self.unchanged_eligible if self.unchanged_eligible else None

    @property
    def all_tied_rate(self) -> float | None:
        ranked = self.submitted - self.all_bad
        return self.all_tied / ranked if ranked > 0 else None


def _has_flag(flags: object) -> bool:
    if isinstance(flags, dict):
        return any(bool(v) for v in flags.values())
    return bool(flags)


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _suspicions(s: AnnotatorStats, rules: SuspicionRules) -> list[str]:
    found = []
    if s.unchanged_eligible >= rules.min_annotations and (s.unchanged_rate or 0) >= rules.unchanged_rate:
        found.append(f"kept the shown order in {s.unchanged}/{s.unchanged_eligible} tasks with 3+ responses")
    if s.timed >= rules.min_annotations and (s.fast_rate or 0) >= rules.fast_rate:
        found.append(f"{s.fast}/{s.timed} submissions in under {rules.fast_ms / 1000:g} s")
    ranked = s.submitted - s.all_bad
    if ranked >= rules.min_annotations and (s.all_tied_rate or 0) >= rules.all_tied_rate:
        found.append(f"tied every response in {s.all_tied}/{ranked} rankings")
    return found


def annotator_stats(
    db: Session, rules: SuspicionRules | None = None, now: datetime | None = None
) -> list[AnnotatorStats]:
    """One row per user who has annotated, busiest first."""
    rules = rules or SuspicionRules()
    now = _aware(now or utcnow())
    sizes = select(TaskResponse.task_id, func.count().label("k")).group_by(TaskResponse.task_id).subquery()
    rows = db.execute(
        select(
            Annotation.user_id,
            Annotation.skipped,
            Annotation.all_bad,
            Annotation.flags,
            Annotation.time_spent_ms,
            Annotation.shown_order_unchanged,
            Annotation.ranking,
            Annotation.created_at,
            sizes.c.k,
        ).outerjoin(sizes, sizes.c.task_id == Annotation.task_id)
    )
    stats: dict[int, AnnotatorStats] = {}
    times: dict[int, list[int]] = defaultdict(list)
    for user_id, skipped, all_bad, flags, time_ms, unchanged, ranking, created_at, k in rows:
        s = stats.setdefault(user_id, AnnotatorStats(user_id, str(user_id)))
        created_at = _aware(created_at)
        s.total += 1
        s.flagged += _has_flag(flags)
        s.first_at = created_at if s.first_at is None else min(s.first_at, created_at)
        s.last_at = created_at if s.last_at is None else max(s.last_at, created_at)
        if skipped:
            s.skipped += 1
            continue
        s.submitted += 1
        s.last_24h += created_at >= now - timedelta(days=1)
        s.last_7d += created_at >= now - timedelta(days=7)
        if time_ms and time_ms > 0:
            times[user_id].append(int(time_ms))
            s.fast += time_ms < rules.fast_ms
        if all_bad:
            s.all_bad += 1
        elif ranking and len(ranking) == 1 and len(ranking[0]) >= 2:
            s.all_tied += 1
        if (k or 0) >= 3:
            s.unchanged_eligible += 1
            s.unchanged += bool(unchanged)

    names = dict(db.execute(select(User.id, User.username).where(User.id.in_(list(stats)))).all())
    for user_id, s in stats.items():
        s.username = names.get(user_id, s.username)
        spent = times.get(user_id, [])
        s.timed = len(spent)
        if spent:
            s.median_ms = float(statistics.median(spent))
            s.per_hour = len(spent) / (sum(spent) / 3_600_000)
        s.suspicious = _suspicions(s, rules)
    return sorted(stats.values(), key=lambda s: (-s.submitted, s.username))
