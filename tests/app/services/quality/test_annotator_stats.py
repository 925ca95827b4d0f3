"""Annotator stats: throughput, median time, rates and suspicious patterns, against hand counts."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.data.models import utcnow
from app.services.quality.annotator_stats import SuspicionRules, annotator_stats
from tests.world import World


def test_throughput_times_and_rates(db):
    w = World(db)
    ann = w.user("ann")
    now = utcnow()
    # three submissions of 2 s, 4 s and 6 s: median 4 s; 3 tasks in 12 s of work = 900 per hour
    w.judge(w.task(3), ann, [[0], [1], [2]], time_ms=2000, at=now - timedelta(hours=1))
    w.judge(w.task(3), ann, [[1], [0, 2]], time_ms=6000, at=now - timedelta(days=2), flags={0: ["harmful"]})
    w.judge(w.task(3), ann, [[2], [1], [0]], time_ms=4000, at=now - timedelta(days=10), all_bad=True)
    w.skip(w.task(3), ann, time_ms=300, at=now)  # skips: not timed, not fast
    w.judge(w.task(3), ann, [[0], [1], [2]], time_ms=0, at=now)  # no time reported

    (s,) = annotator_stats(db, now=now)
    assert (s.username, s.total, s.submitted, s.skipped) == ("ann", 5, 4, 1)
    assert s.median_ms == 4000 and s.timed == 3
    assert s.per_hour == pytest.approx(3 / (12_000 / 3_600_000))
    assert (s.last_24h, s.last_7d) == (2, 3)
    assert s.skip_rate == pytest.approx(1 / 5)
    assert s.flag_rate == pytest.approx(1 / 5)
    assert s.all_bad_rate == pytest.approx(1 / 4)
    assert s.fast == 0 and s.suspicious == []


def test_suspicious_patterns_are_named(db):
    w = World(db)
    clicker, careful, pairs_only = w.user("clicker"), w.user("careful"), w.user("pairs")
    for i in range(12):
        # clicker: shown order kept on every 4-response task, 8 of 12 in under a second
        w.judge(w.task(4), clicker, [[0], [1], [2], [3]], time_ms=400 if i < 8 else 3000)
        # careful: one unchanged order in 12 (chance level), all slow, ranks with ties sometimes
        w.judge(w.task(4), careful, [[1], [0], [2, 3]] if i else [[0], [1], [2], [3]])
        # two-response tasks keep the shown order half the time by chance: not measured
        w.judge(w.task(2), pairs_only, [[0], [1]])
    lazy = w.user("lazy")
    for _ in range(10):
        w.judge(w.task(3), lazy, [[0, 1, 2]])  # everything tied

    rows = {s.username: s for s in annotator_stats(db)}
    assert rows["clicker"].unchanged_rate == 1.0 and rows["clicker"].fast_rate == pytest.approx(8 / 12)
    assert len(rows["clicker"].suspicious) == 2
    assert "shown order" in rows["clicker"].suspicious[0] and "12/12" in rows["clicker"].suspicious[0]
    assert "8/12" in rows["clicker"].suspicious[1]
    assert rows["careful"].suspicious == [] and rows["careful"].unchanged_rate == pytest.approx(1 / 12)
    assert rows["pairs"].unchanged_eligible == 0 and rows["pairs"].suspicious == []
    assert rows["lazy"].all_tied_rate == 1.0 and "tied every response" in rows["lazy"].suspicious[0]

    # below the minimum count, rates prove nothing
    assert all(s.suspicious == [] for s in annotator_stats(db, SuspicionRules(min_annotations=50)))
