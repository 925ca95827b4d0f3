"""The reward model's check against chance: the binomial tail by hand, and what the admin is told."""

from __future__ import annotations

import pytest

from workers.training.significance import (
    binomial_upper_tail,
    chance_p_value,
    correct_needed,
    reward_model_problem,
)


def test_the_binomial_tail_by_hand():
    # P(K >= 8 | n = 10) = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = (45 + 10 + 1) / 1024
    assert binomial_upper_tail(8, 10) == pytest.approx(56 / 1024)
    assert binomial_upper_tail(9, 10) == pytest.approx(11 / 1024)
    assert binomial_upper_tail(5, 5) == pytest.approx(1 / 32)
    assert binomial_upper_tail(0, 7) == 1.0 and binomial_upper_tail(8, 7) == 0.0
    # 9 of 10 (p = 0.0107) passes at 0.05, 8 of 10 (p = 0.0547) does not.
    assert correct_needed(10, 0.05) == 9
    assert correct_needed(5, 0.05) == 5  # 1/32 = 0.031
    assert correct_needed(4, 0.05) is None  # even 4 of 4 is 1/16 = 0.0625


def test_a_reward_model_above_chance_passes():
    metrics = {"val_accuracy": 0.9, "val_pairs": 10}
    assert chance_p_value(metrics) == pytest.approx(11 / 1024)
    assert reward_model_problem(metrics, 0.05) is None
    assert reward_model_problem({"val_accuracy": 0.5, "val_pairs": 10}, None) is None  # check off


def test_a_reward_model_at_chance_stops_the_round_saying_what_to_do():
    problem = reward_model_problem({"val_accuracy": 0.8, "val_pairs": 10}, 0.05)
    assert problem.startswith(
        "the reward model is not better than chance on its held-out comparisons: 8 of 10 pairs right "
        "(accuracy 0.80); one-sided binomial test P(K >= 8 | n=10, p=1/2) = 0.055 > 0.05 "
        "(9 of 10 would be needed); PPO was not started."
    )
    assert "Collect more comparisons, or cleaner ones" in problem
    few = reward_model_problem({"val_accuracy": 1.0, "val_pairs": 3}, 0.05)
    assert "3 held-out pairs are too few for any accuracy to show it" in few
    none = reward_model_problem({"reward_mean": 0.0, "reward_std": 1.0}, 0.05)
    assert none.startswith("the reward model has no held-out comparisons") and "Collect more" in none
