"""Point estimates with confidence intervals, shared by the quality modules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.common.win_rate import wilson_bounds


@dataclass(frozen=True)
class Estimate:
    """A statistic and its confidence interval; NaN where the data cannot define it."""

    value: float
    low: float = math.nan
    high: float = math.nan

    @property
    def defined(self) -> bool:
        return not math.isnan(self.value)

    def as_dict(self) -> dict[str, float | None]:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {"value": clean(self.value), "low": clean(self.low), "high": clean(self.high)}


NAN = Estimate(math.nan)


def percentile_interval(value: float, draws: np.ndarray, confidence: float) -> Estimate:
    """Percentile bootstrap interval: the (1-c)/2 and (1+c)/2 quantiles of the finite draws."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if math.isnan(value) or draws.size == 0:
        return Estimate(value)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Estimate(float(value), float(low), float(high))


def resample_counts(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray | None:
    """(n_boot, n_clusters) counts of how often each cluster is drawn in each bootstrap resample.

    One matrix serves every statistic of the same clusters, so they are resampled together (and drawn once).
    None when there is nothing to resample.
    """
    if n_boot <= 0 or n_clusters < 2:
        return None
    # Drawing indices and counting them is the same multinomial, and several times faster than
    # numpy's multinomial sampler for thousands of clusters.
    picks = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    counts = np.empty((n_boot, n_clusters))
    for row, drawn in enumerate(picks):
        counts[row] = np.bincount(drawn, minlength=n_clusters)
    return counts


def ratio_interval(
    numerators: np.ndarray, denominators: np.ndarray, counts: np.ndarray | None, confidence: float
) -> Estimate:
    """sum(num)/sum(den) over clusters (tasks), with the interval from resampled cluster counts."""
    numerators = np.asarray(numerators, dtype=float)
    denominators = np.asarray(denominators, dtype=float)
    total = denominators.sum()
    if total <= 0:
        return NAN
    value = float(numerators.sum() / total)
    if counts is None:
        return Estimate(value)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (counts @ numerators) / (counts @ denominators)
    return percentile_interval(value, draws, confidence)


def ratio_bootstrap(
    numerators: np.ndarray, denominators: np.ndarray, n_boot: int, rng: np.random.Generator, confidence: float
) -> Estimate:
    """sum(num)/sum(den) with a cluster bootstrap: clusters (tasks) are resampled with replacement."""
    counts = resample_counts(len(numerators), n_boot, rng)
    return ratio_interval(numerators, denominators, counts, confidence)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> Estimate:
    """Wilson score interval for a proportion: honest at small counts, unlike the normal approximation."""
    if trials <= 0:
        return NAN
    low, high = wilson_bounds(successes, trials, confidence)
    return Estimate(successes / trials, low, high)
