"""Inter-annotator agreement on tasks that two or more annotators ranked.

Two measures, each overall, per prompt set and for each annotator against the others:

- Pairwise agreement: for every two annotators of a task and every two responses they both
  ranked, do they order the pair the same way (better / worse / tie)? `strict_agreement` keeps
  only the pairs both annotators ordered strictly, the number comparable to a reward model's
  accuracy (InstructGPT reports about 73% between labelers).
- Krippendorff's alpha with the ordinal metric. A unit is one response of one task; each
  annotator's value is the response's fractional rank in their ranking (a tie group shares the
  mean of the positions it covers: [[a, b], [c]] gives a=1.5, b=1.5, c=3). Alpha is
  1 - D_o / D_e: observed disagreement within units over the disagreement expected by chance
  from the pooled values (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
  For one annotator "against the others", D_o is restricted to the pairs that include their
  value and D_e stays the pooled one, so the annotators' figures average (weighted by values)
  to the overall D_o.

Confidence intervals come from a cluster bootstrap over tasks (responses of one task are not
independent); an annotator's interval resamples the tasks they annotated. Skipped and all-bad
annotations carry no ranking that becomes training data, so they are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import Annotation, Prompt, PromptSet, Task, User
from app.services.quality.intervals import NAN, Estimate, percentile_interval, ratio_interval, resample_counts

METRICS = ("nominal", "ordinal", "interval")
Ranking = Sequence[Sequence[int]]


# ---------------------------------------------------------------- rankings


def fractional_ranks(ranking: Ranking) -> dict[int, float]:
    """Response id -> rank (1 = best); a tie group shares the mean of the positions it covers."""
    ranks: dict[int, float] = {}
    position = 0
    for group in ranking:
        mid = position + (len(group) + 1) / 2
        for response_id in group:
            ranks[int(response_id)] = mid
        position += len(group)
    return ranks


# ---------------------------------------------------------------- Krippendorff's alpha


def _delta2(n_c: np.ndarray, values: np.ndarray, metric: str) -> np.ndarray:
    """Squared distance between value categories; n_c holds the pooled counts, shape (..., V)."""
    if metric == "nominal":
        v = len(values)
        return np.broadcast_to(1.0 - np.eye(v), n_c.shape[:-1] + (v, v)).copy()
    if metric == "interval":
        d = values[None, :] - values[:, None]
        return np.broadcast_to(d * d, n_c.shape[:-1] + d.shape).copy()
    if metric == "ordinal":
        # delta(c, k) = sum_{g=c..k} n_g - (n_c + n_k) / 2 for c <= k; in cumulative sums this is
        # cum[k] - cum[c] + (n_c - n_k) / 2, and the same expression squared serves c > k.
        cum = np.cumsum(n_c, axis=-1)
        d = cum[..., None, :] - cum[..., :, None] + (n_c[..., :, None] - n_c[..., None, :]) / 2.0
        return d * d
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")


def alpha_from_coincidences(o: np.ndarray, values: np.ndarray, metric: str = "ordinal") -> np.ndarray:
    """Alpha from coincidence matrices o of shape (..., V, V); NaN where no disagreement is possible."""
    o = np.asarray(o, dtype=float)
    n_c = o.sum(axis=-1)
    n = n_c.sum(axis=-1)
    d2 = _delta2(n_c, np.asarray(values, dtype=float), metric)
    observed = (o * d2).sum(axis=(-1, -2))
    expected = (n_c[..., :, None] * n_c[..., None, :] * d2).sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = 1.0 - (n - 1.0) * observed / expected
    return np.where(expected > 0, alpha, np.nan)


def _unit_coincidences(counts: np.ndarray) -> np.ndarray:
    """Sum over units of (c c^T - diag c) / (m_u - 1); counts is (U, V) value counts per unit."""
    m = counts.sum(axis=1)
    keep = m >= 2  # a value with no partner in its unit is not pairable
    counts, m = counts[keep], m[keep]
    if counts.size == 0:
        return np.zeros((counts.shape[1], counts.shape[1]))
    outer = counts[:, :, None] * counts[:, None, :]
    outer -= np.einsum("uv,vw->uvw", counts, np.eye(counts.shape[1]))
    return (outer / (m - 1.0)[:, None, None]).sum(axis=0)


def krippendorff_alpha(data: Sequence[Sequence[float | None]], metric: str = "ordinal") -> float:
    """Alpha of a coders x units table (None or NaN = missing), the layout of Krippendorff's examples."""
    table = np.array([[math.nan if x is None else float(x) for x in row] for row in data], dtype=float)
    values = np.unique(table[~np.isnan(table)])
    counts = np.zeros((table.shape[1], len(values)))
    for coder_row in table:
        present = ~np.isnan(coder_row)
        counts[np.nonzero(present)[0], np.searchsorted(values, coder_row[present])] += 1
    return float(alpha_from_coincidences(_unit_coincidences(counts), values, metric))


# ---------------------------------------------------------------- per-task summaries


@dataclass
class TaskRankings:
    """The non-skipped rankings of one task: user id -> response id -> fractional rank."""

    task_id: int
    prompt_set_id: int | None
    rankings: dict[int, dict[int, float]]


@dataclass
class _TaskSummary:
    task_id: int
    prompt_set_id: int | None
    users: list[int]
    counts: np.ndarray  # (units, V) value counts
    user_values: dict[int, list[tuple[int, int]]]  # user -> [(unit index, value index)]
    # pairwise judgements: [agree, total, strict agree, strict total], overall and per user
    pairs: np.ndarray
    user_pairs: dict[int, np.ndarray]
    coincidences: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _summarise(task: TaskRankings, value_index: dict[float, int], n_values: int) -> _TaskSummary:
    users = sorted(task.rankings)
    units = sorted({r for ranks in task.rankings.values() for r in ranks})
    unit_index = {r: i for i, r in enumerate(units)}
    counts = np.zeros((len(units), n_values))
    table = np.full((len(users), len(units)), np.nan)
    user_values: dict[int, list[tuple[int, int]]] = {}
    for row, user in enumerate(users):
        entries = []
        for response_id, rank in task.rankings[user].items():
            u, v = unit_index[response_id], value_index[rank]
            counts[u, v] += 1
            table[row, u] = rank
            entries.append((u, v))
        user_values[user] = entries

    # sign[a, i, j] = +1 if annotator a put i above j, -1 below, 0 tied; NaN if either is unranked.
    sign = np.sign(table[:, None, :] - table[:, :, None])
    upper = np.triu(np.ones((len(units), len(units)), dtype=bool), k=1)
    pairs = np.zeros(4)
    user_pairs = {u: np.zeros(4) for u in users}
    for a in range(len(users)):
        for b in range(a + 1, len(users)):
            both = upper & ~np.isnan(sign[a]) & ~np.isnan(sign[b])
            same = both & (sign[a] == sign[b])
            strict = both & (sign[a] != 0) & (sign[b] != 0)
            tally = np.array([same.sum(), both.sum(), (same & strict).sum(), strict.sum()], dtype=float)
            pairs += tally
            user_pairs[users[a]] += tally
            user_pairs[users[b]] += tally
    summary = _TaskSummary(task.task_id, task.prompt_set_id, users, counts, user_values, pairs, user_pairs)
    summary.coincidences = _unit_coincidences(counts)
    return summary


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class AgreementRow:
    """Agreement over one slice of the data (everything, one prompt set, or one annotator)."""

    label: str
    tasks: int
    annotators: int
    annotations: int
    judgements: int  # annotator pair x response pair comparisons
    agreement: Estimate
    strict_judgements: int
    strict_agreement: Estimate
    values: int  # pairable rank values behind alpha
    alpha: Estimate
    prompt_set_id: int | None = None
    user_id: int | None = None

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "tasks": self.tasks,
            "annotators": self.annotators,
            "annotations": self.annotations,
            "judgements": self.judgements,
            "agreement": self.agreement.as_dict(),
            "strict_judgements": self.strict_judgements,
            "strict_agreement": self.strict_agreement.as_dict(),
            "values": self.values,
            "alpha": self.alpha.as_dict(),
        }


@dataclass(frozen=True)
class AgreementReport:
    overall: AgreementRow
    by_prompt_set: list[AgreementRow]
    by_annotator: list[AgreementRow]
    n_boot: int
    confidence: float

    def as_dict(self) -> dict:
        return {
            "method": "pairwise agreement and Krippendorff's alpha (ordinal, fractional ranks), "
            "tasks with >= 2 non-skipped, non-all-bad annotations; cluster bootstrap over tasks",
            "confidence": self.confidence,
            "n_boot": self.n_boot,
            "overall": self.overall.as_dict(),
            "by_prompt_set": [r.as_dict() for r in self.by_prompt_set],
        }


def _group_row(
    label: str,
    summaries: list[_TaskSummary],
    values: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    confidence: float,
    prompt_set_id: int | None = None,
) -> AgreementRow:
    pairs = np.array([s.pairs for s in summaries]).reshape(-1, 4)
    counts = resample_counts(len(summaries), n_boot, rng)  # one resample of tasks for all three figures
    agreement = ratio_interval(pairs[:, 0], pairs[:, 1], counts, confidence)
    strict = ratio_interval(pairs[:, 2], pairs[:, 3], counts, confidence)
    alpha = NAN
    n_pairable = 0
    if summaries:
        per_task = np.stack([s.coincidences for s in summaries]).reshape(len(summaries), -1)  # (T, V*V)
        total = per_task.sum(axis=0).reshape(len(values), len(values))
        n_pairable = int(round(total.sum()))
        value = float(alpha_from_coincidences(total, values))
        if not math.isnan(value) and counts is not None:
            boot = (counts @ per_task).reshape(-1, len(values), len(values))
            alpha = percentile_interval(value, alpha_from_coincidences(boot, values), confidence)
        elif not math.isnan(value):
            alpha = Estimate(value)
    users = {u for s in summaries for u in s.users}
    return AgreementRow(
        label=label,
        tasks=len(summaries),
        annotators=len(users),
        annotations=sum(len(s.users) for s in summaries),
        judgements=int(pairs[:, 1].sum()),
        agreement=agreement,
        strict_judgements=int(pairs[:, 3].sum()),
        strict_agreement=strict,
        values=n_pairable,
        alpha=alpha,
        prompt_set_id=prompt_set_id,
    )


def _annotator_rows(
    summaries: list[_TaskSummary],
    values: np.ndarray,
    usernames: dict[int, str],
    n_boot: int,
    rng: np.random.Generator,
    confidence: float,
) -> list[AgreementRow]:
    if not summaries:
        return []
    pooled = np.stack([s.coincidences for s in summaries]).sum(axis=0)
    n_c = pooled.sum(axis=1)
    n = n_c.sum()
    d2 = _delta2(n_c, values, "ordinal")
    expected = (n_c[:, None] * n_c[None, :] * d2).sum() / (n * (n - 1.0)) if n > 1 else 0.0

    per_user: dict[int, list[tuple[np.ndarray, float, float]]] = defaultdict(list)
    for s in summaries:
        m = s.counts.sum(axis=1)
        for user, entries in s.user_values.items():
            disagreement, weight = 0.0, 0.0
            for unit, v in entries:
                if m[unit] < 2:
                    continue
                # distance from this value to every other value in the unit (its own copy adds 0)
                disagreement += float(s.counts[unit] @ d2[v]) / (m[unit] - 1.0)
                weight += 1.0
            per_user[user].append((s.user_pairs[user], disagreement, weight))

    rows = []
    for user in sorted(per_user, key=lambda u: usernames.get(u, str(u))):
        items = per_user[user]
        pairs = np.array([p for p, _, _ in items])
        dis = np.array([d for _, d, _ in items])
        wts = np.array([w for _, _, w in items])
        counts = resample_counts(len(items), n_boot, rng)  # this annotator's tasks, resampled
        if expected > 0 and wts.sum() > 0:
            # 1 - D_o/D_e is a ratio of sums over tasks, so the ratio bootstrap applies to D_o.
            d_o = ratio_interval(dis, wts, counts, confidence)
            alpha = Estimate(1 - d_o.value / expected, 1 - d_o.high / expected, 1 - d_o.low / expected)
        else:
            alpha = NAN
        rows.append(
            AgreementRow(
                label=usernames.get(user, f"user {user}"),
                tasks=len(items),
                annotators=1,
                annotations=len(items),
                judgements=int(pairs[:, 1].sum()),
                agreement=ratio_interval(pairs[:, 0], pairs[:, 1], counts, confidence),
                strict_judgements=int(pairs[:, 3].sum()),
                strict_agreement=ratio_interval(pairs[:, 2], pairs[:, 3], counts, confidence),
                values=int(wts.sum()),
                alpha=alpha,
                user_id=user,
            )
        )
    return rows


def compute_agreement(
    tasks: Iterable[TaskRankings],
    prompt_set_names: dict[int, str] | None = None,
    usernames: dict[int, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> AgreementReport:
    """Agreement over the given tasks (those with fewer than two rankings are ignored)."""
    tasks = [t for t in tasks if len(t.rankings) >= 2]
    values = np.array(sorted({r for t in tasks for ranks in t.rankings.values() for r in ranks.values()}))
    value_index = {float(v): i for i, v in enumerate(values)}
    summaries = [_summarise(t, value_index, len(values)) for t in tasks]
    rng = np.random.default_rng(seed)
    names = prompt_set_names or {}

    overall = _group_row("all prompt sets", summaries, values, n_boot, rng, confidence)
    by_set: dict[int | None, list[_TaskSummary]] = defaultdict(list)
    for s in summaries:
        by_set[s.prompt_set_id].append(s)
    set_rows = [
        _group_row(names.get(k, f"prompt set {k}"), group, values, n_boot, rng, confidence, prompt_set_id=k)
        for k, group in sorted(by_set.items(), key=lambda kv: names.get(kv[0], str(kv[0])))
    ]
    user_rows = _annotator_rows(summaries, values, usernames or {}, n_boot, rng, confidence)
    return AgreementReport(overall, set_rows, user_rows, n_boot, confidence)


# ---------------------------------------------------------------- database


def load_task_rankings(db: Session, exclude_user_ids: Iterable[int] = ()) -> list[TaskRankings]:
    """Rankings of every task with at least two usable (not skipped, not all-bad) annotations."""
    usable = [Annotation.skipped.is_(False), Annotation.all_bad.is_(False)]
    excluded = list(exclude_user_ids)
    if excluded:
        usable.append(Annotation.user_id.not_in(excluded))
    overlapped = select(Annotation.task_id).where(*usable).group_by(Annotation.task_id)
    overlapped = overlapped.having(func.count() >= 2)
    rows = db.execute(
        select(Annotation.task_id, Annotation.user_id, Annotation.ranking, Prompt.prompt_set_id)
        .join(Task, Task.id == Annotation.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(*usable, Annotation.task_id.in_(overlapped.scalar_subquery()))
        .order_by(Annotation.task_id, Annotation.user_id)
    )
    tasks: dict[int, TaskRankings] = {}
    for task_id, user_id, ranking, prompt_set_id in rows:
        ranks = fractional_ranks(ranking or [])
        if not ranks:
            continue
        task = tasks.setdefault(task_id, TaskRankings(task_id, prompt_set_id, {}))
        task.rankings[user_id] = ranks
    return [t for t in tasks.values() if len(t.rankings) >= 2]


def agreement_report(
    db: Session, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> AgreementReport:
    """Agreement overall, per prompt set and per annotator, with bootstrap intervals."""
    tasks = load_task_rankings(db)
    set_ids = {t.prompt_set_id for t in tasks}
    user_ids = {u for t in tasks for u in t.rankings}
    set_names = dict(db.execute(select(PromptSet.id, PromptSet.name).where(PromptSet.id.in_(set_ids))).all())
    usernames = dict(db.execute(select(User.id, User.username).where(User.id.in_(user_ids))).all())
    return compute_agreement(tasks, set_names, usernames, n_boot=n_boot, seed=seed, confidence=confidence)
