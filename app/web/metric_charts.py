"""How a run's metrics are charted on its page: which chart each series goes on, which axis, and the
words shown for it.

Series that share a word share a chart (reward_raw and reward_normalised, say). Within a chart,
series whose typical sizes differ by more than SCALE_RATIO get a second y axis; a third size gets a
chart of its own, so no line is flattened against the axis of another.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from typing import Any

# Matching runs losses first, so that e.g. "reward_loss" lands with the losses.
CHART_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Losses", lambda w: w == "loss" or w.endswith("loss")),
    ("Accuracy", lambda w: w.startswith("acc")),
    ("KL", lambda w: w == "kl" or w.startswith("kl")),
    ("Length", lambda w: w in ("length", "len", "tokens")),
    ("Reward", lambda w: w.startswith("reward") or w in ("score", "scores")),
)
# Shown in this order (the loop's headline figures first), then every other chart by name.
CHART_ORDER = ("Reward", "KL", "Length", "Accuracy", "Losses")
SCALE_RATIO = 20.0

# Names the trainers report, in words; others are spelled out word by word (WORDS).
METRIC_LABELS = {
    "lr": "Learning rate",
    "lr_policy": "Learning rate (policy)",
    "kl_ref": "KL to the reference",
    "kl_ref_per_token": "KL to the reference per token",
    "approx_kl": "Approximate KL (update)",
    "reward_raw": "Reward (raw)",
    "reward_raw_std": "Reward spread (raw, std. dev.)",
    "reward_normalised": "Reward (normalised)",
    "eos_share": "Responses ending with EOS",
    "ppl_policy": "Perplexity (policy)",
    "ppl_reference": "Perplexity (reference)",
    "policy_clipfrac": "Clipped share (policy)",
    "value_clipfrac": "Clipped share (value)",
    "grad_norm": "Gradient norm",
    "tokens_per_s": "Tokens per second",
    "step_seconds": "Seconds per step",
    "generation_seconds": "Generation seconds per step",
}
WORDS = {
    "kl": "KL",
    "lr": "learning rate",
    "std": "std. dev.",
    "eos": "EOS",
    "ppl": "perplexity",
    "acc": "accuracy",
    "rm": "reward model",
    "val": "validation",
    "eval": "evaluation",
    "clipfrac": "clipped share",
    "len": "length",
    "s": "seconds",
}


def chart_group(name: str) -> str:
    """The chart a metric belongs on: a known group by the words of its name, else its own name."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    for title, matches in CHART_GROUPS:
        if any(matches(w) for w in words):
            return title
    return name


def metric_label(name: str) -> str:
    """A metric's name in words: 'kl_ref' → 'KL to the reference', 'value_loss' → 'Value loss'."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    words = [WORDS.get(w.lower(), w) for w in re.split(r"[_/.\s]+", name) if w]
    text = " ".join(words) or name
    return text[0].upper() + text[1:]


def typical_size(points: list[list[Any]]) -> float | None:
    """The median of a series' absolute values, leaving out gaps and zeros; None when nothing is left."""
    sizes = [abs(v) for _, v in points if isinstance(v, int | float) and math.isfinite(v) and v != 0]
    return statistics.median(sizes) if sizes else None


def _by_scale(names: list[str], series: dict[str, list[list[Any]]]) -> list[list[str]]:
    """The names in groups of similar size, smallest first; series without a size join the first."""
    sized = sorted((s, n) for n in names if (s := typical_size(series[n])) is not None)
    groups: list[list[str]] = []
    first_size = 0.0
    for size, name in sized:
        if groups and size <= first_size * SCALE_RATIO:
            groups[-1].append(name)
        else:
            groups.append([name])
            first_size = size
    unsized = [n for n in names if typical_size(series[n]) is None]
    if not groups:
        return [unsized]
    groups[0] = unsized + groups[0]
    return groups


def chart_layout(series: dict[str, list[list[Any]]]) -> list[dict[str, Any]]:
    """Charts for the run page: title (the group), label (in words), names, and each name's y axis."""
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(chart_group(name), []).append(name)
    order = list(CHART_ORDER)
    ordered = sorted(
        groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])
    )
    charts = []
    for title, names in ordered:
        label = title if title in order else metric_label(title)
        scales = _by_scale(names, series)
        axes = {name: "y" for name in scales[0]} | {
            name: "y1" for name in (scales[1] if len(scales) > 1 else [])
        }
        charts.append({"title": title, "label": label, "names": list(axes), "axes": axes})
        for extra in scales[2:]:  # a third size and beyond: a panel of its own
            charts.append(
                {
                    "title": f"{title}: {extra[0]}",
                    "label": f"{label}: {metric_label(extra[0])}" + (" and others" if len(extra) > 1 else ""),
                    "names": extra,
                    "axes": {name: "y" for name in extra},
                }
            )
    return charts
