"""A win rate over prompts with a confidence interval that respects the prompt as the unit.

Two policies answer the same prompts, k samples each; sample i of one is compared with sample i of
the other (a win counts 1, a tie 1/2, a loss 0). The k comparisons of one prompt are not
independent (they share the prompt), so the prompt is the unit: each prompt contributes its mean
score w_i in [0, 1], and the win rate is the mean of the w_i over n prompts.

Intervals:
- `wilson`: the Wilson score interval with n = prompts and successes = sum(w_i). A score in [0, 1]
  with mean p has variance at most p(1 - p), the Bernoulli variance Wilson assumes, so the interval
  is conservative for fractional scores and exact in form for whole ones; it stays inside [0, 1]
  and is honest at small n. It can be checked by hand.
- `bootstrap`: the percentile bootstrap over prompts (resample prompts with replacement, keep all
  k samples of each drawn prompt), the cluster bootstrap; tighter when prompts vary little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

INTERVALS = ("wilson", "bootstrap")


@dataclass(frozen=True)
class WinRate:
    """A win rate with its interval, and how it was computed."""

    value: float
    low: float
    high: float
    prompts: int
    comparisons: int
    confidence: float
    method: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def outcome(candidate: float, other: float) -> float:
    """1 when the candidate's score is higher, 1/2 on a tie, 0 when lower."""
    return 1.0 if candidate > other else 0.5 if candidate == other else 0.0


def normal_quantile(confidence: float) -> float:
    """z with P(|Z| <= z) = confidence for a standard normal Z (1.959964 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    lo, hi = 0.0, 10.0
    for _ in range(100):  # bisection on erf: one number does not need scipy
        mid = (lo + hi) / 2
        if math.erf(mid / math.sqrt(2)) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson_bounds(successes: float, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for successes out of trials (successes may be fractional)."""
    if trials <= 0:
        return math.nan, math.nan
    z = normal_quantile(confidence)
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def prompt_scores(outcomes: Sequence[Sequence[float]]) -> list[float]:
    """Each prompt's mean outcome over its samples."""
    if any(len(row) == 0 for row in outcomes):
        raise ValueError("every prompt needs at least one compared sample")
    return [sum(row) / len(row) for row in outcomes]


def win_rate(
    outcomes: Sequence[Sequence[float]],
    confidence: float = 0.95,
    method: str = "wilson",
    draws: int = 2000,
    seed: int = 0,
) -> WinRate:
    """The win rate of `outcomes[prompt][sample]` (1 win, 1/2 tie, 0 loss) with its interval."""
    if method not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, not {method!r}")
    if not outcomes:
        raise ValueError("a win rate needs at least one prompt")
    scores = np.asarray(prompt_scores(outcomes), dtype=float)
    n = len(scores)
    value = float(scores.mean())
    if method == "wilson":
        low, high = wilson_bounds(float(scores.sum()), n, confidence)
    else:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, n, size=(draws, n))
        means = scores[picks].mean(axis=1)
        tail = (1.0 - confidence) / 2.0
        low, high = (float(x) for x in np.quantile(means, [tail, 1.0 - tail]))
    return WinRate(
        value=value,
        low=float(low),
        high=float(high),
        prompts=n,
        comparisons=sum(len(row) for row in outcomes),
        confidence=confidence,
        method=method,
    )
