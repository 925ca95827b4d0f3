"""The win rate over prompts and its interval, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from app.common.win_rate import normal_quantile, outcome, prompt_scores, wilson_bounds, win_rate


def test_the_normal_quantile_of_a_95_percent_interval():
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert normal_quantile(0.90) == pytest.approx(1.644854, abs=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(1.0)


def test_wilson_seven_of_ten():
    # z = 1.959964, z² = 3.841459; p = 0.7, n = 10
    # centre = (0.7 + 3.841459/20) / (1 + 3.841459/10) = 0.892073 / 1.384146 = 0.644493
    # half = z * sqrt(0.21/10 + 3.841459/400) / 1.384146 = 1.959964 * 0.174939 / 1.384146 = 0.247714
    low, high = wilson_bounds(7, 10)
    assert low == pytest.approx(0.644493 - 0.247714, abs=1e-5)
    assert high == pytest.approx(0.644493 + 0.247714, abs=1e-5)


def test_wilson_on_eighteen_of_twenty_three_prompts_is_wide():
    # 78% on 23 prompts: the interval spans 0.58 to 0.90, too wide to tell a small gain.
    low, high = wilson_bounds(18, 23)
    assert (round(low, 2), round(high, 2)) == (0.58, 0.90)


def test_wilson_at_the_edges_stays_inside_zero_one():
    # p = 1, n = 3: centre = (1 + z²/6) / (1 + z²/3), half = z * sqrt(z²/36) / (1 + z²/3)
    z2 = 1.959964**2
    low, high = wilson_bounds(3, 3)
    assert low == pytest.approx((1 + z2 / 6 - z2 / 6) / (1 + z2 / 3), abs=1e-6)  # = 0.438503
    assert high == 1.0
    assert wilson_bounds(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(x) for x in wilson_bounds(0, 0))


def test_outcomes_and_prompt_scores():
    assert [outcome(2.0, 1.0), outcome(1.0, 1.0), outcome(0.0, 1.0)] == [1.0, 0.5, 0.0]
    assert prompt_scores([[1, 1], [1, 0], [0.5, 0.5]]) == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="at least one compared sample"):
        prompt_scores([[1], []])


def test_the_prompt_is_the_unit_of_the_wilson_interval():
    # Four prompts × two samples; prompt means 1, 0.5, 0.5, 1: 3 successes in 4 trials, not 6 in 8.
    rate = win_rate([[1, 1], [1, 0], [0.5, 0.5], [1, 1]])
    assert rate.value == 0.75 and rate.prompts == 4 and rate.comparisons == 8
    # p = 0.75, n = 4: centre = (0.75 + z²/8) / (1 + z²/4) = 1.230182 / 1.960365 = 0.627527
    # half = z * sqrt(0.1875/4 + z²/64) / 1.960365 = 1.959964 * 0.326953 / 1.960365 = 0.326886
    assert rate.low == pytest.approx(0.627527 - 0.326886, abs=1e-5)
    assert rate.high == pytest.approx(min(1.0, 0.627527 + 0.326886), abs=1e-5)
    assert rate.method == "wilson" and rate.confidence == 0.95


def test_the_cluster_bootstrap_over_two_prompts():
    # Prompts scoring 0 and 1: resampled means are 0, 1/2, 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1.
    rate = win_rate([[0, 0, 0], [1, 1, 1]], method="bootstrap", draws=4000)
    assert rate.value == 0.5 and (rate.low, rate.high) == (0.0, 1.0)
    same = win_rate([[0.5, 0.5]] * 6, method="bootstrap")
    assert (same.low, same.value, same.high) == (0.5, 0.5, 0.5)


def test_a_win_rate_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="at least one prompt"):
        win_rate([])
    with pytest.raises(ValueError, match="interval must be one of wilson, bootstrap"):
        win_rate([[1]], method="normal")
