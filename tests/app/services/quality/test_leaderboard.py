"""Bradley-Terry leaderboard: hand-solved fits, battles from arena annotations, intervals, exclusion."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from app.services.quality.gold import mark_gold
from app.services.quality.leaderboard import (
    ELO_SCALE,
    Battle,
    battles_from_annotation,
    compute_leaderboard,
    export_leaderboard,
    fit_bradley_terry,
    leaderboard,
)
from tests.world import World


def test_two_versions_by_hand():
    # A beats B 3 times out of 4: the fit gives P(A beats B) = 3/4 exactly, so
    # theta_A - theta_B = ln(3/4 / 1/4) = ln 3, i.e. 400 * log10(3) = 190.85 Elo.
    wins = np.array([[0.0, 3.0], [1.0, 0.0]])
    for method in ("newton", "mm"):
        theta = fit_bradley_terry(wins, method=method)
        assert theta[0] - theta[1] == pytest.approx(math.log(3))
    assert ELO_SCALE * math.log(3) == pytest.approx(400 * math.log10(3))


def test_ties_count_half_by_hand():
    # A-B: A wins 2, B wins 1, 2 ties -> A has 2 + 1 = 3 "wins", B has 1 + 1 = 2.
    # P(A beats B) = 3/5, so the gap is ln(3/2) = 400 log10(1.5) = 70.44 Elo.
    battles = [Battle(1, 2, 1.0)] * 2 + [Battle(1, 2, 0.0)] + [Battle(1, 2, 0.5)] * 2
    board = compute_leaderboard(battles, {1: (0, "base"), 2: (1, "ppo")}, n_boot=0, pseudo_ties=0)
    by_version = {e.version: e for e in board.entries}
    assert by_version[0].rating.value == pytest.approx(1000.0)  # the oldest version anchors the scale
    assert by_version[1].rating.value == pytest.approx(1000.0 - 400 * math.log10(1.5))
    assert (by_version[0].wins, by_version[0].losses, by_version[0].ties, by_version[0].battles) == (
        2,
        1,
        2,
        5,
    )


def test_three_versions_by_hand():
    # Strengths pi = (4, 2, 1) reproduce every observed win count exactly, so they are the MLE:
    #   A-B: 3 games, A expected 3 * 4/6 = 2 (observed 2); B-C: 3 games, B expected 3 * 2/3 = 2 (2);
    #   A-C: 5 games, A expected 5 * 4/5 = 4 (4).
    # Elo with C (version 0) as anchor: C 1000, B 1000 + 400 log10 2 = 1120.4, A 1240.8.
    wins = np.array([[0.0, 2.0, 4.0], [1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    for method in ("newton", "mm"):
        theta = fit_bradley_terry(wins, method=method)
        assert np.exp(theta - theta[2]) == pytest.approx([4.0, 2.0, 1.0])
    battles = (
        [Battle(1, 2, 1.0)] * 2
        + [Battle(1, 2, 0.0)]  # policy 1 = A (v2), 2 = B (v1), 3 = C (v0)
        + [Battle(2, 3, 1.0)] * 2
        + [Battle(2, 3, 0.0)]
        + [Battle(1, 3, 1.0)] * 4
        + [Battle(1, 3, 0.0)]
    )
    board = compute_leaderboard(
        battles, {1: (2, "ppo"), 2: (1, "ppo"), 3: (0, "base")}, n_boot=0, pseudo_ties=0
    )
    assert [e.version for e in board.entries] == [2, 1, 0]
    assert [e.rating.value for e in board.entries] == pytest.approx(
        [1000 + 800 * math.log10(2), 1000 + 400 * math.log10(2), 1000]
    )


def test_newton_and_mm_agree_on_an_irregular_tournament():
    rng = np.random.default_rng(0)
    wins = rng.integers(1, 9, size=(5, 5)).astype(float)
    np.fill_diagonal(wins, 0)
    for pseudo in (0.0, 2.0):
        newton = fit_bradley_terry(wins, pseudo, method="newton")
        mm = fit_bradley_terry(wins, pseudo, method="mm")
        assert newton == pytest.approx(mm, abs=1e-7)
        # at the optimum the expected wins equal the observed wins (the likelihood equations)
        p = 1 / (1 + np.exp(-(newton[:, None] - newton[None, :])))
        expected = ((wins + wins.T) * p).sum(axis=1) + pseudo * (1 / (1 + np.exp(-newton)))
        assert expected == pytest.approx(wins.sum(axis=1) + pseudo / 2, abs=1e-6)


def test_a_version_that_won_everything_needs_pseudo_ties():
    wins = np.array([[0.0, 3.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="pseudo_ties"):
        fit_bradley_terry(wins)
    theta = fit_bradley_terry(wins, pseudo_ties=1.0)
    assert np.isfinite(theta).all() and theta[0] > theta[1]


def test_battles_from_one_annotation():
    policy = {10: 1, 11: 1, 20: 2, 21: 2}
    # ranking 20 > (10 = 21) > 11: cross pairs (10,20) 20 wins, (10,21) tie, (11,20) 20 wins, (11,21) 21 wins
    battles = battles_from_annotation([[20], [10, 21], [11]], False, policy)
    assert sorted((b.a, b.b, b.outcome) for b in battles) == [
        (1, 2, 0.0),
        (1, 2, 0.0),
        (1, 2, 0.0),
        (1, 2, 0.5),
    ]
    # "both bad" is a tie for every cross pair; same-policy pairs never battle
    assert {b.outcome for b in battles_from_annotation([], True, policy)} == {0.5}
    assert len(battles_from_annotation([], True, policy)) == 4
    assert battles_from_annotation([[10], [11]], False, {10: 1, 11: 1}) == []


def test_intervals_bracket_ratings_and_shrink_with_more_battles():
    rng = random.Random(0)
    truth = {1: 0.0, 2: 60.0, 3: 120.0}  # Elo gaps

    def battles(n):
        out = []
        for _ in range(n):
            a, b = sorted(rng.sample(list(truth), 2))
            p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
            out.append(Battle(a, b, 1.0 if rng.random() < p else 0.0))
        return out

    policies = {1: (0, "base"), 2: (1, "ppo"), 3: (2, "ppo")}
    small = compute_leaderboard(battles(150), policies, n_boot=300, seed=1)
    large = compute_leaderboard(battles(2400), policies, n_boot=300, seed=1)
    for board in (small, large):
        for e in board.entries:
            assert e.rating.low <= e.rating.value <= e.rating.high
        anchor = next(e for e in board.entries if e.version == 0)
        assert anchor.rating.low == anchor.rating.high == 1000.0
    width = {e.version: e.rating.high - e.rating.low for e in small.entries}
    width_large = {e.version: e.rating.high - e.rating.low for e in large.entries}
    assert width_large[2] < width[2] / 2
    # with enough battles the strongest version is clearly first
    assert large.entries[0].version == 2 and large.entries[0].rank == 1 and large.entries[-1].rank == 3


def test_leaderboard_from_arena_tasks_excludes_flagged_annotators(db, settings):
    w = World(db, settings)
    base, ppo = w.policy(0, "base"), w.policy(1, "ppo")
    fans = [w.user() for _ in range(3)]
    saboteur = w.user("saboteur")
    for _ in range(4):
        task = w.task(2, kind="arena", versions=[0, 1], required=4)  # position 0 = v0, 1 = v1
        for fan in fans:
            w.judge(task, fan, [[1], [0]])  # v1 wins
        w.judge(task, saboteur, [[0], [1]])  # v0 wins
    rank_task = w.task(3)  # rank tasks are not battles
    w.judge(rank_task, fans[0], [[0], [1], [2]])

    board = leaderboard(db, settings, n_boot=100)
    assert board.battles == 16
    top = board.entries[0]
    assert (top.version, top.wins, top.losses) == (1, 12, 4)
    assert top.rating.value == pytest.approx(1000 + 400 * math.log10(3), rel=0.05)  # pulled in by pseudo ties

    # the saboteur fails gold tasks, is flagged, and their battles drop out
    for _ in range(settings.gold_min_answers):
        gold = w.task(3)
        mark_gold(db, gold.id, w.shown(gold)[0], settings)
        db.commit()
        w.judge(gold, saboteur, [[0], [1], [2]])  # the gold response is now shown last
    board = leaderboard(db, settings, n_boot=100)
    assert board.battles == 12
    assert [(e.version, e.wins, e.losses) for e in board.entries] == [(1, 12, 0), (0, 0, 12)]

    exported = export_leaderboard(db, settings, n_boot=50)
    json.dumps(exported)  # ready for a JSON file in an export
    assert exported["anchor_version"] == 0 and exported["battles"] == 12
    assert [e["policy_version"] for e in exported["entries"]] == [1, 0]
    assert exported["pairs"] == [
        {"version_a": 0, "version_b": 1, "battles": 12, "a_wins": 0, "b_wins": 12, "ties": 0}
    ]
    assert base.id != ppo.id
