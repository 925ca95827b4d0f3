"""The policy leaderboard: Bradley-Terry ratings of policy versions from arena battles, Elo scale.

A battle is one annotator's verdict on two responses of different policy versions in an arena
task: the one ranked higher wins; a tie group, or "all bad", is a tie (Chatbot Arena counts
"both bad" as a tie too). Ties count half a win to each side.

Model: P(i beats j) = sigma(theta_i - theta_j). The log-likelihood with wins matrix W
(W[i, j] = wins of i over j + half the ties) is sum_ij W_ij log sigma(theta_i - theta_j).
It is maximised by Newton's method (concave, so a few damped steps reach 1e-10); Hunter's (2004)
MM iteration is kept as a cross-check. `pseudo_ties` adds that many virtual ties of every
policy against an average opponent (theta = 0), which keeps a version that won or lost every
battle finite, at the price of pulling ratings toward the mean by about one battle's worth.

Ratings are reported as Elo: 400/ln(10) * theta, shifted so the anchor version (the oldest one,
normally the base policy) is at 1000. Intervals: percentile bootstrap over battles (multinomial
resampling of the battle counts, as FastChat does), each draw refitted and re-anchored; a
version's rank is 1 + the number of versions whose lower bound is above its upper bound.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import Annotation, Policy, Response, Task, TaskResponse
from app.services.quality.agreement import fractional_ranks
from app.services.quality.gold import usable_annotation_clause
from app.services.quality.intervals import Estimate, percentile_interval

ELO_SCALE = 400.0 / math.log(10.0)  # one natural-log unit of strength in Elo points (~173.7)
ELO_BASE = 1000.0


# ---------------------------------------------------------------- fitting


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def _log_likelihood(theta: np.ndarray, wins: np.ndarray, pseudo_ties: float) -> float:
    diff = theta[:, None] - theta[None, :]
    ll = float((wins * _log_sigmoid(diff)).sum())
    if pseudo_ties > 0:
        ll += pseudo_ties * 0.5 * float((_log_sigmoid(theta) + _log_sigmoid(-theta)).sum())
    return ll


def _strongly_connected(wins: np.ndarray) -> bool:
    """Zermelo's condition for a finite maximum: every version beat (or tied) its way to every other."""
    reach = (wins > 0) | np.eye(len(wins), dtype=bool)
    for k in range(len(wins)):
        reach |= reach[:, [k]] & reach[[k], :]
    return bool(reach.all())


def fit_bradley_terry(
    wins: np.ndarray,
    pseudo_ties: float = 0.0,
    method: str = "newton",
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> np.ndarray:
    """Natural-log strengths theta maximising the Bradley-Terry likelihood.

    Mean zero without pseudo ties; with them, relative to the virtual opponent at theta = 0.

    wins[i, j] = wins of i over j, ties already counted as half a win to each side.
    Without pseudo ties the maximum must exist (the wins graph strongly connected), else ValueError.
    """
    wins = np.asarray(wins, dtype=float)
    p = len(wins)
    if p == 0:
        return np.zeros(0)
    if p == 1:
        return np.zeros(1)
    if pseudo_ties <= 0 and not _strongly_connected(wins):
        raise ValueError(
            "no finite Bradley-Terry fit: some version won (or lost) every battle against the rest; "
            "use pseudo_ties > 0"
        )
    if method == "newton":
        theta = _newton(wins, pseudo_ties, tol, max_iter)
    elif method == "mm":
        theta = _mm(wins, pseudo_ties, tol, max_iter)
    else:
        raise ValueError(f"unknown method {method!r}; use 'newton' or 'mm'")
    # Without pseudo ties strengths are defined up to a constant: report them with mean zero.
    return theta - theta.mean() if pseudo_ties <= 0 else theta


def _newton(wins: np.ndarray, a: float, tol: float, max_iter: int) -> np.ndarray:
    p = len(wins)
    games = wins + wins.T
    theta = np.zeros(p)
    ll = _log_likelihood(theta, wins, a)
    for _ in range(min(max_iter, 200)):
        prob = _sigmoid(theta[:, None] - theta[None, :])
        grad = (wins - games * prob).sum(axis=1)
        curv = games * prob * (1 - prob)
        hess = curv - np.diag(curv.sum(axis=1))
        if a > 0:
            s = _sigmoid(theta)
            grad += a * (0.5 - s)
            hess -= np.diag(a * s * (1 - s))
            step = np.linalg.solve(hess, -grad)
        else:
            # Strengths are defined up to a constant: hold the last one at 0 and solve for the rest.
            step = np.zeros(p)
            step[:-1] = np.linalg.solve(hess[:-1, :-1], -grad[:-1])
        scale = 1.0
        while True:  # damped: the full Newton step can overshoot far from the optimum
            candidate = theta + scale * step
            new_ll = _log_likelihood(candidate, wins, a)
            if new_ll >= ll - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, ll = candidate, new_ll
        if np.max(np.abs(scale * step)) < tol:
            break
    return theta


def _mm(wins: np.ndarray, a: float, tol: float, max_iter: int) -> np.ndarray:
    games = wins + wins.T
    won = wins.sum(axis=1) + a / 2
    strength = np.ones(len(wins))
    for _ in range(max_iter):
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        if a > 0:
            denom += a / (strength + 1.0)  # the virtual opponent has strength 1 (theta 0)
        new = won / denom
        if a <= 0:
            new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(strength))) < tol
        strength = new
        if done:
            break
    return np.log(strength)


# ---------------------------------------------------------------- battles


@dataclass(frozen=True)
class Battle:
    a: int  # policy id, a < b
    b: int
    outcome: float  # 1 = a won, 0 = b won, 0.5 = tie


def battles_from_annotation(
    ranking: Sequence[Sequence[int]] | None, all_bad: bool, response_policy: dict[int, int | None]
) -> list[Battle]:
    """Every pair of responses from different policy versions in one annotation, as battles."""
    responses = sorted(r for r, pol in response_policy.items() if pol is not None)
    ranks = {} if all_bad else fractional_ranks(ranking or [])
    found = []
    for x, rx in enumerate(responses):
        for ry in responses[x + 1 :]:
            pa, pb = response_policy[rx], response_policy[ry]
            if pa == pb:
                continue
            if all_bad:
                outcome = 0.5
            elif rx in ranks and ry in ranks:
                outcome = 1.0 if ranks[rx] < ranks[ry] else 0.0 if ranks[rx] > ranks[ry] else 0.5
            else:
                continue
            if pa > pb:  # type: ignore[operator]
                pa, pb, outcome = pb, pa, 1.0 - outcome
            found.append(Battle(pa, pb, outcome))  # type: ignore[arg-type]
    return found


# ---------------------------------------------------------------- the leaderboard


@dataclass(frozen=True)
class LeaderboardEntry:
    policy_id: int
    version: int
    kind: str
    rank: int
    rating: Estimate  # Elo points with the bootstrap interval
    battles: int
    wins: int
    losses: int
    ties: int

    def as_dict(self) -> dict:
        return {
            "policy_version": self.version,
            "kind": self.kind,
            "rank": self.rank,
            "rating": self.rating.as_dict(),
            "battles": self.battles,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
        }


@dataclass(frozen=True)
class PairRecord:
    version_a: int
    version_b: int
    battles: int
    a_wins: int
    b_wins: int
    ties: int


@dataclass(frozen=True)
class Leaderboard:
    entries: list[LeaderboardEntry]
    pairs: list[PairRecord]
    battles: int
    anchor_version: int | None
    n_boot: int
    confidence: float
    pseudo_ties: float

    def as_dict(self) -> dict:
        return {
            "method": "Bradley-Terry on arena battles (tie = half a win each), Newton fit, Elo scale "
            f"(400/ln 10 per unit), anchor version {self.anchor_version} = {ELO_BASE:g}, "
            f"{self.pseudo_ties:g} pseudo tie(s) per version vs an average opponent, "
            f"percentile bootstrap over battles ({self.n_boot} draws)",
            "confidence": self.confidence,
            "battles": self.battles,
            "anchor_version": self.anchor_version,
            "entries": [e.as_dict() for e in self.entries],
            "pairs": [p.__dict__ for p in self.pairs],
        }


def compute_leaderboard(
    battles: Iterable[Battle],
    policies: dict[int, tuple[int, str]],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    pseudo_ties: float = 1.0,
    anchor_version: int | None = None,
) -> Leaderboard:
    """Ratings from battles; `policies` maps policy id -> (version, kind).

    The anchor defaults to the oldest version in the battles; pass -1 to centre on the mean instead.
    """
    tally: dict[tuple[int, int, float], int] = defaultdict(int)
    for b in battles:
        tally[(b.a, b.b, b.outcome)] += 1
    players = sorted({pid for a, b, _ in tally for pid in (a, b)}, key=lambda pid: policies[pid][0])
    if not players:
        return Leaderboard([], [], 0, None, n_boot, confidence, pseudo_ties)
    index = {pid: i for i, pid in enumerate(players)}
    keys = list(tally)
    counts = np.array([tally[k] for k in keys], dtype=float)
    # contribution of one battle of each kind to the wins matrix
    contrib = np.zeros((len(keys), len(players), len(players)))
    for r, (a, b, outcome) in enumerate(keys):
        contrib[r, index[a], index[b]] += outcome
        contrib[r, index[b], index[a]] += 1.0 - outcome
    flat = contrib.reshape(len(keys), -1)

    versions = [policies[pid][0] for pid in players]
    if anchor_version is None:
        anchor_version = min(versions)
    anchor = versions.index(anchor_version) if anchor_version in versions else None

    def to_elo(theta: np.ndarray) -> np.ndarray:
        shift = theta[anchor] if anchor is not None else theta.mean()
        return ELO_BASE + ELO_SCALE * (theta - shift)

    wins = (counts @ flat).reshape(len(players), len(players))
    ratings = to_elo(fit_bradley_terry(wins, pseudo_ties))
    draws = np.full((max(n_boot, 0), len(players)), np.nan)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        total = int(counts.sum())
        samples = rng.multinomial(total, counts / counts.sum(), size=n_boot)
        for i, sample in enumerate(samples):
            w = (sample @ flat).reshape(len(players), len(players))
            # Without pseudo ties a resample can lose connectivity; that draw has no fit (stays NaN).
            with contextlib.suppress(ValueError):
                draws[i] = to_elo(fit_bradley_terry(w, pseudo_ties))
    estimates = [percentile_interval(float(ratings[i]), draws[:, i], confidence) for i in range(len(players))]

    per_player = defaultdict(lambda: [0, 0, 0])  # wins, losses, ties
    pairs = []
    for a, b in sorted({(a, b) for a, b, _ in tally}):
        a_wins, b_wins, ties = tally[(a, b, 1.0)], tally[(a, b, 0.0)], tally[(a, b, 0.5)]
        per_player[a][0] += a_wins
        per_player[a][1] += b_wins
        per_player[b][0] += b_wins
        per_player[b][1] += a_wins
        per_player[a][2] += ties
        per_player[b][2] += ties
        va, vb = policies[a][0], policies[b][0]
        if va < vb:  # report the older version first
            pairs.append(PairRecord(va, vb, a_wins + b_wins + ties, a_wins, b_wins, ties))
        else:
            pairs.append(PairRecord(vb, va, a_wins + b_wins + ties, b_wins, a_wins, ties))

    def rank_of(i: int) -> int:
        high = estimates[i].high if not math.isnan(estimates[i].high) else estimates[i].value
        return 1 + sum(
            1
            for j, e in enumerate(estimates)
            if j != i and (e.low if not math.isnan(e.low) else e.value) > high
        )

    entries = [
        LeaderboardEntry(
            policy_id=pid,
            version=policies[pid][0],
            kind=policies[pid][1],
            rank=rank_of(i),
            rating=estimates[i],
            battles=sum(per_player[pid]),
            wins=per_player[pid][0],
            losses=per_player[pid][1],
            ties=per_player[pid][2],
        )
        for i, pid in enumerate(players)
    ]
    entries.sort(key=lambda e: (-e.rating.value, e.version))
    pairs.sort(key=lambda r: (r.version_a, r.version_b))
    return Leaderboard(
        entries,
        pairs,
        int(counts.sum()),
        anchor_version if anchor is not None else None,
        n_boot,
        confidence,
        pseudo_ties,
    )


def load_arena_battles(db: Session, settings=None) -> list[Battle]:
    """Battles from every usable arena annotation (excluded annotators are left out, like training)."""
    layout: dict[int, dict[int, int | None]] = defaultdict(dict)
    for task_id, response_id, policy_id in db.execute(
        select(TaskResponse.task_id, TaskResponse.response_id, Response.policy_id)
        .join(Task, Task.id == TaskResponse.task_id)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(Task.kind == "arena")
    ):
        layout[task_id][response_id] = policy_id
    battles: list[Battle] = []
    for task_id, ranking, all_bad in db.execute(
        select(Annotation.task_id, Annotation.ranking, Annotation.all_bad)
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.kind == "arena", Annotation.skipped.is_(False), usable_annotation_clause(db, settings))
    ):
        battles.extend(battles_from_annotation(ranking, all_bad, layout.get(task_id, {})))
    return battles


def leaderboard(
    db: Session,
    settings=None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    pseudo_ties: float = 1.0,
) -> Leaderboard:
    """The leaderboard of every policy version that fought at least one arena battle."""
    battles = load_arena_battles(db, settings)
    ids = {pid for b in battles for pid in (b.a, b.b)}
    policies = {
        pid: (version, kind)
        for pid, version, kind in db.execute(
            select(Policy.id, Policy.version, Policy.kind).where(Policy.id.in_(list(ids)))
        )
    }
    return compute_leaderboard(
        battles, policies, n_boot=n_boot, seed=seed, confidence=confidence, pseudo_ties=pseudo_ties
    )


def export_leaderboard(db: Session, settings=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The leaderboard as a JSON-ready dict, for researcher exports (dataset card, leaderboard.json)."""
    return leaderboard(db, settings, n_boot=n_boot, seed=seed).as_dict()
