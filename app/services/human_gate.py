"""Human confirmation: a candidate goes into blind arena tasks against the policy it would replace,
and the annotators' votes decide, through the Bradley-Terry lower bound.

A round whose gate runs in human mode, once the candidate has passed the held-out judge's checks,
asks for a generation run that answers held-out prompts with both versions and makes one arena task
per prompt (the versions are never shown). The round then waits (`awaiting_votes`, still holding
the one active slot, so no second candidate competes for the same votes). Beat calls
`settle_rounds_awaiting_votes` every maintenance tick:

- fewer than `arena_min_votes` votes: wait (a bootstrap over a handful of votes says little);
- the candidate's Bradley-Terry rating, anchored at the live version, has its lower bound above
  the live version's (the leaderboard's fit and percentile bootstrap): promote;
- its upper bound below: humans prefer the live policy, reject;
- `arena_max_votes` votes, or every arena task judged, with neither: not shown better, reject;
- otherwise wait. The admin console shows the tally and this reason while it waits.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.data.models import Policy, Prompt, Round, Run
from app.services import dispatch
from app.services.promotion import promote
from app.services.quality.leaderboard import ELO_BASE, Battle, compute_leaderboard, load_arena_battles
from app.services.rounds import finish_round
from app.services.tasks_pool import close_open_arena_tasks, open_arena_task_count

log = logging.getLogger(__name__)

AWAITING_VOTES = "awaiting_votes"


@dataclass(frozen=True)
class Verdict:
    """Where the human votes stand on a candidate against the live version."""

    decision: str  # promote, reject or wait
    reason: str
    votes: int
    wins: int  # the candidate's
    losses: int
    ties: int
    elo_gain: float | None  # candidate's rating minus the live version's, Elo points
    elo_gain_low: float | None
    elo_gain_high: float | None
    confidence: float
    min_votes: int
    max_votes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 3)


def arena_verdict(
    battles: list[Battle],
    candidate: tuple[int, int],
    live: tuple[int, int],
    min_votes: int,
    max_votes: int,
    tasks_left: bool = True,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> Verdict:
    """The decision from the battles between `candidate` and `live`, each (policy id, version)."""
    pair = {candidate[0], live[0]}
    mine = [b for b in battles if {b.a, b.b} == pair]
    wins = sum(1 for b in mine if (b.outcome == 1.0) == (b.a == candidate[0]) and b.outcome != 0.5)
    ties = sum(1 for b in mine if b.outcome == 0.5)
    losses = len(mine) - wins - ties
    votes = len(mine)
    gain = low = high = math.nan
    if mine:
        board = compute_leaderboard(
            mine,
            {candidate[0]: (candidate[1], "candidate"), live[0]: (live[1], "live")},
            n_boot=n_boot,
            seed=seed,
            confidence=confidence,
            anchor_version=live[1],
        )
        rating = next(e.rating for e in board.entries if e.policy_id == candidate[0])
        gain, low, high = rating.value - ELO_BASE, rating.low - ELO_BASE, rating.high - ELO_BASE
    tally = f"{votes} votes: {wins} for the candidate, {losses} for the live policy, {ties} ties"
    bounds = f"Elo gain {gain:+.0f} [{low:+.0f}, {high:+.0f}] at {confidence:.0%}" if mine else ""
    if votes < min_votes:
        decision = "wait" if tasks_left else "reject"
        reason = (
            f"waiting for votes: {tally}; a verdict needs at least {min_votes}"
            if tasks_left
            else f"every arena task was judged with only {tally}, fewer than the {min_votes} a verdict needs"
        )
    elif low > 0:
        decision, reason = "promote", f"humans prefer the candidate: {tally}; {bounds}, lower bound above 0"
    elif high < 0:
        decision, reason = "reject", f"humans prefer the live policy: {tally}; {bounds}, upper bound below 0"
    elif votes >= max_votes or not tasks_left:
        limit = f"after {max_votes} votes" if votes >= max_votes else "with every arena task judged"
        decision, reason = "reject", f"not shown better {limit}: {tally}; {bounds}, the interval spans 0"
    else:
        decision, reason = "wait", f"no verdict yet: {tally}; {bounds}, the interval spans 0"
    return Verdict(
        decision=decision,
        reason=reason,
        votes=votes,
        wins=wins,
        losses=losses,
        ties=ties,
        elo_gain=_clean(gain),
        elo_gain_low=_clean(low),
        elo_gain_high=_clean(high),
        confidence=confidence,
        min_votes=min_votes,
        max_votes=max_votes,
    )


# ---------------------------------------------------------------- the round's side


def open_arena(
    db: Session,
    round_: Round,
    candidate: Policy,
    live: Policy,
    gate: dict[str, Any],
    max_new_tokens: int,
    settings: Settings | None = None,
    enqueue: bool = True,
) -> int:
    """Ask for arena tasks (candidate vs live) on held-out prompts and let the round wait for votes
    (committed); returns the generation run's id."""
    settings = settings or get_settings()
    prompt_ids = list(db.scalars(select(Prompt.id).where(Prompt.split == "eval").order_by(Prompt.id)))
    if not prompt_ids:
        raise ValueError("human confirmation needs eval-split prompts: upload a prompt set first")
    rng = random.Random(round_.id)
    rng.shuffle(prompt_ids)
    chosen = prompt_ids[: int(gate.get("arena_prompts", 48))]
    run = Run(
        kind="generate",
        status="queued",
        config={
            "policy_version": candidate.version,
            "prompt_ids": [],
            "arena_prompt_ids": chosen,
            "arena_versions": [candidate.version, live.version],
            "responses_per_task": settings.responses_per_task,
            "required_annotations": settings.task_overlap,
            "sampling": {"max_new_tokens": max_new_tokens},
            "seed": rng.randrange(2**31),
        },
    )
    db.add(run)
    db.flush()
    round_.status = round_.stage = AWAITING_VOTES
    round_.gate = {
        **(round_.gate or {}),
        "human": {
            "arena_run_id": run.id,
            "arena_prompts": len(chosen),
            "candidate_version": candidate.version,
            "live_version": live.version,
            "decision": "wait",
            "reason": "arena tasks are being generated",
        },
    }
    db.commit()
    if enqueue:
        dispatch.enqueue(dispatch.GENERATE_RESPONSES, run.id)
    return run.id


def _round_policies(db: Session, round_: Round) -> tuple[Policy | None, Policy | None]:
    candidate = db.scalar(select(Policy).where(Policy.round_id == round_.id).order_by(Policy.version.desc()))
    live = db.get(Policy, round_.base_policy_id) if round_.base_policy_id else None
    return candidate, live


def round_verdict(db: Session, round_: Round, settings: Settings | None = None) -> Verdict | None:
    """Where the votes on this round's candidate stand now (None without a candidate or arena)."""
    human = (round_.gate or {}).get("human")
    candidate, live = _round_policies(db, round_)
    if not human or candidate is None or live is None:
        return None
    gate = (round_.config or {}).get("gate", {})
    arena_run = db.get(Run, human.get("arena_run_id")) if human.get("arena_run_id") else None
    generating = arena_run is not None and arena_run.status in ("queued", "running")
    tasks_left = generating or open_arena_task_count(db, candidate.id) > 0
    return arena_verdict(
        load_arena_battles(db, settings),
        (candidate.id, candidate.version),
        (live.id, live.version),
        min_votes=int(gate.get("arena_min_votes", 20)),
        max_votes=int(gate.get("arena_max_votes", 200)),
        tasks_left=tasks_left,
        confidence=float(gate.get("confidence", 0.95)),
        seed=round_.id,
    )


def settle_round(db: Session, round_: Round, settings: Settings | None = None) -> str:
    """Record the votes on the round and act on the verdict; returns the decision."""
    human = dict((round_.gate or {}).get("human") or {})
    arena_run = db.get(Run, human.get("arena_run_id")) if human.get("arena_run_id") else None
    candidate, _live = _round_policies(db, round_)
    if candidate is None:
        finish_round(db, round_, "failed", error="the round's candidate is missing from the registry")
        return "reject"
    if arena_run is not None and arena_run.status in ("failed", "cancelled"):
        verdict_reason = (
            f"the arena tasks could not be made: generation run {arena_run.id} {arena_run.status}"
        )
        human |= {"decision": "reject", "reason": verdict_reason}
        return _reject(db, round_, candidate, human, verdict_reason)
    verdict = round_verdict(db, round_, settings)
    if verdict is None:
        return "wait"
    human |= verdict.as_dict()
    if verdict.decision == "wait":
        round_.gate = {**round_.gate, "human": human}
        db.commit()
        return "wait"
    if verdict.decision == "reject":
        return _reject(db, round_, candidate, human, verdict.reason)
    close_open_arena_tasks(db, candidate.id)
    round_.gate = {**round_.gate, "human": human}
    auto_promote = bool((round_.config or {}).get("auto_promote", True))
    candidate.status = "approved"
    if not auto_promote:
        finish_round(db, round_, "awaiting_approval")
        return "promote"
    round_.stage = "promote"
    db.commit()
    try:
        promote(db, candidate.version, settings)
    except Exception as exc:
        log.exception("round %s: promoting v%s failed", round_.id, candidate.version)
        db.rollback()
        error = f"promoting v{candidate.version} failed: {type(exc).__name__}: {exc}"
        finish_round(db, db.get(Round, round_.id), "failed", error=error)
        return "reject"
    finish_round(db, round_, "succeeded")
    return "promote"


def _reject(db: Session, round_: Round, candidate: Policy, human: dict, reason: str) -> str:
    close_open_arena_tasks(db, candidate.id)
    candidate.status = "rejected"
    round_.gate = {**round_.gate, "human": human}
    finish_round(
        db, round_, "failed", error=f"candidate v{candidate.version} rejected by the arena votes: {reason}"
    )
    return "reject"


def settle_rounds_awaiting_votes(db: Session, settings: Settings | None = None) -> dict[int, str]:
    """Beat: act on the votes of every round waiting for them; returns {round id: decision}."""
    decisions = {}
    for round_ in db.scalars(select(Round).where(Round.status == AWAITING_VOTES).order_by(Round.id)).all():
        decisions[round_.id] = settle_round(db, round_, settings)
    return decisions
