"""Simulated annotators for the efficacy benchmark, after AlpacaFarm: each has a standard of its own
that the product does not know, and judges with label noise.

A standard scores one answer (higher is better); it looks only at the text, as a person reading it
would. The product never sees a standard: it learns one from the rankings, as it would from people.

- `concise`: a complete answer in few words (about 25 to 45), ending on a full stop.
- `structured`: an answer laid out in steps or bullet points, one idea per line.
- `warm`: a friendly, encouraging tone: kind words, the reader addressed as "you", an exclamation.

Noise: each pair of answers is judged by the standard and the verdict flipped with probability
`noise` (AlpacaFarm flips 25% of its simulated labels); the ranking submitted is the order by noisy
wins (Copeland), ties broken at random. The share of derived pairs that disagree with the standard
is measured, not assumed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Standard = Callable[[str], float]

_WORD = re.compile(r"[A-Za-z0-9']+")
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
_WARM_WORDS = {
    "glad",
    "happy",
    "great",
    "wonderful",
    "lovely",
    "hope",
    "enjoy",
    "welcome",
    "kind",
    "please",
    "thanks",
    "thank",
    "good",
    "luck",
    "best",
    "excited",
    "sure",
}


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ends_finished(text: str) -> bool:
    """The answer ends on sentence punctuation (not cut off mid-sentence)."""
    return bool(re.search(r"[.!?)\]`\"']\s*$", text.strip()))


def concise(text: str) -> float:
    """Best at 25-45 words and finished; each word outside that band costs a little."""
    n = len(words(text))
    if n == 0:
        return -10.0
    outside = max(0, 25 - n) + max(0, n - 45)
    return (1.0 if ends_finished(text) else 0.0) - outside / 15.0


def structured(text: str) -> float:
    """Lines that are list items or steps count most, then separate lines; one wall of text scores 0."""
    lines = [line for line in text.splitlines() if line.strip()]
    items = sum(1 for line in lines if _LIST_LINE.match(line))
    return min(items, 8) + 0.25 * min(len(lines) - 1, 8) if lines else -10.0


def warm(text: str) -> float:
    """Kind words and "you" per 20 words, and an exclamation mark, make an answer warmer."""
    tokens = [w.lower() for w in words(text)]
    if not tokens:
        return -10.0
    kind = sum(1 for w in tokens if w in _WARM_WORDS) + 0.5 * sum(1 for w in tokens if w in ("you", "your"))
    return 20.0 * kind / max(len(tokens), 20) + (0.5 if "!" in text else 0.0)


STANDARDS: dict[str, Standard] = {"concise": concise, "structured": structured, "warm": warm}


def standard_named(name: str) -> Standard:
    if name not in STANDARDS:
        raise ValueError(f"unknown standard {name!r}; choose {', '.join(STANDARDS)}")
    return STANDARDS[name]


# ---------------------------------------------------------------- judging with noise


def noisy_pair_wins(scores: Sequence[float], noise: float, rng: random.Random) -> list[list[int]]:
    """wins[i][j] = 1 when the annotator prefers answer i to answer j: the standard's verdict (a tie
    decided by a coin), flipped with probability `noise`."""
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be between 0 and 0.5, not {noise}")
    n = len(scores)
    wins = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            i_better = scores[i] > scores[j] or (scores[i] == scores[j] and rng.random() < 0.5)
            if rng.random() < noise:
                i_better = not i_better
            wins[i][j], wins[j][i] = (1, 0) if i_better else (0, 1)
    return wins


def noisy_ranking(scores: Sequence[float], noise: float, rng: random.Random) -> list[int]:
    """Indexes of the answers best first: by noisy pairwise wins, ties in random order."""
    wins = noisy_pair_wins(scores, noise, rng)
    tiebreak = [rng.random() for _ in scores]
    return sorted(range(len(scores)), key=lambda i: (-sum(wins[i]), tiebreak[i]))


@dataclass
class NoiseTally:
    """How the pairs derived from the submitted rankings compare with the standard."""

    pairs: int = 0
    against_standard: int = 0  # the ranking puts the answer the standard prefers lower
    standard_ties: int = 0  # the standard cannot tell the two apart

    def add(self, ranking: Sequence[int], scores: Sequence[float]) -> None:
        for a, better in enumerate(ranking):
            for worse in ranking[a + 1 :]:
                self.pairs += 1
                if scores[better] == scores[worse]:
                    self.standard_ties += 1
                elif scores[better] < scores[worse]:
                    self.against_standard += 1

    @property
    def disagreement(self) -> float:
        decided = self.pairs - self.standard_ties
        return self.against_standard / decided if decided else 0.0


class SimulatedAnnotator:
    """Ranks the answers of a task by its standard, with noise; counts how noisy it really was."""

    def __init__(self, standard: str, noise: float = 0.25, seed: int = 0):
        self.name = standard
        self.standard = standard_named(standard)
        self.noise = noise
        self.rng = random.Random(seed)
        self.tally = NoiseTally()

    def rank(self, texts: Sequence[str]) -> list[int]:
        scores = [self.standard(t) for t in texts]
        order = noisy_ranking(scores, self.noise, self.rng)
        self.tally.add(order, scores)
        return order

    def judge_fn(self):
        """The standard without noise, as the evaluation's judge: (prompt_texts, texts, ids) -> scores."""
        return lambda _prompts, texts, _ids: [self.standard(t) for t in texts]
