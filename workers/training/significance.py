"""Is the reward model better than a coin? A one-sided binomial test on its held-out accuracy.

A reward model that orders its held-out pairs no better than chance learnt nothing PPO should climb:
optimising it only moves the policy at random, away from the base. Under the null hypothesis the
model picks the chosen response of each held-out pair with probability 1/2, so the number it gets
right, K, is Binomial(n, 1/2) and the one-sided p-value of k right answers is

    p = P(K >= k) = sum_{i=k}^{n} C(n, i) / 2^n.

The reward model passes when p <= alpha (0.05 by default). Ties count as wrong. Pairs from one ranking
of more than two responses share responses, so they are not fully independent; the test is then a
little optimistic, which is the safe side for a check that only stops rounds that have no signal.
Pure Python, no torch: the round driver imports it.
"""

from __future__ import annotations

from math import comb


def binomial_upper_tail(successes: int, trials: int) -> float:
    """P(K >= successes) for K ~ Binomial(trials, 1/2), exactly."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    return sum(comb(trials, i) for i in range(successes, trials + 1)) / 2**trials


def correct_needed(trials: int, alpha: float) -> int | None:
    """The fewest right answers out of `trials` with p <= alpha; None when even all right is not enough."""
    for k in range(trials // 2, trials + 1):
        if binomial_upper_tail(k, trials) <= alpha:
            return k
    return None


def chance_p_value(metrics: dict[str, float]) -> float | None:
    """The p-value of a reward model's held-out accuracy against chance; None without held-out pairs."""
    pairs = int(metrics.get("val_pairs", 0) or 0)
    if pairs == 0 or metrics.get("val_accuracy") is None:
        return None
    correct = round(float(metrics["val_accuracy"]) * pairs)
    return binomial_upper_tail(correct, pairs)


def reward_model_problem(metrics: dict[str, float], alpha: float | None) -> str | None:
    """Why PPO must not train against this reward model, or None when it is above chance (or the check
    is off). The message tells the admin what to do."""
    if alpha is None:
        return None
    advice = (
        "Collect more comparisons, or cleaner ones (the quality page shows annotator agreement and gold "
        "accuracy), then start a new round; reward.above_chance_alpha = null turns this check off."
    )
    pairs = int(metrics.get("val_pairs", 0) or 0)
    p_value = chance_p_value(metrics)
    if p_value is None:
        return (
            "the reward model has no held-out comparisons, so nothing shows it learnt the annotators' "
            f"preference; PPO was not started. {advice}"
        )
    if p_value <= alpha:
        return None
    accuracy = float(metrics["val_accuracy"])
    correct = round(accuracy * pairs)
    needed = correct_needed(pairs, alpha)
    need = (
        f"{needed} of {pairs} would be needed"
        if needed is not None
        else f"{pairs} held-out pairs are too few for any accuracy to show it"
    )
    return (
        f"the reward model is not better than chance on its held-out comparisons: {correct} of {pairs} "
        f"pairs right (accuracy {accuracy:.2f}); one-sided binomial test P(K >= {correct} | n={pairs}, "
        f"p=1/2) = {p_value:.3f} > {alpha} ({need}); PPO was not started. {advice}"
    )
