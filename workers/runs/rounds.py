"""A round, executed in one gpu-queue task: reward model → judge → policy → evaluation → promote → refill.

The comparisons are split by prompt into two disjoint sides: the policy's side trains the reward
model PPO optimises against (and DPO's policy), the judge's side (`gate.judge_share` of the prompts)
trains the held-out judge the evaluation gate scores with. In human mode a candidate that passed
the judge's checks then waits for arena votes (app.services.human_gate settles it).

The round's RoundSpec is read back from its row; each stage is a run row of the round (one per kind)
that carries its section of the spec, executed inline with the usual lifecycle, so a redelivered
round skips the stages that already succeeded and resumes the one in progress from its checkpoint.
The round row records the stage it is at; the admin console reads it.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.common.errors import record_failure
from app.config import get_settings
from app.data.db import session_factory
from app.data.models import Comparison, Policy, Response, Round, Run, utcnow
from app.services.human_gate import open_arena
from app.services.promotion import promote
from app.services.round_spec import RoundSpec, describe_problems
from app.services.rounds import finish_round
from app.services.runs import create_run, execute
from workers.runs.gate import evaluation_body
from workers.runs.training import policy_body, reward_body
from workers.training.significance import reward_model_problem

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    pass


class OwnedElsewhere(RuntimeError):
    """Another delivery of this round's task is executing the stage; this one has nothing to do."""


def _stage(sessions: sessionmaker[Session], round_id: int, kind: str, config: dict[str, Any], body) -> dict:
    """Run (or skip, when it already succeeded) the round's run of this kind; returns its result."""
    with sessions() as db:
        round_ = db.get(Round, round_id)
        round_.stage = kind
        run = db.scalar(select(Run).where(Run.round_id == round_id, Run.kind == kind).order_by(Run.id.desc()))
        if run is None or run.status in ("failed", "cancelled"):
            if run is not None and run.status == "cancelled":
                raise StageFailed(f"{kind} run {run.id} was cancelled")
            run = create_run(db, kind, {**config, "round_id": round_id}, round_id=round_id)
        db.commit()
        run_id = run.id
        if run.status == "succeeded":
            return dict(run.result)
    status = execute(run_id, body, sessions)
    with sessions() as db:
        run = db.get(Run, run_id)
        if status is None and run.status == "running":
            # A duplicate message (a re-send, a redelivery after a lost worker) while a live worker
            # holds the stage: leave the round to it rather than fail it.
            raise OwnedElsewhere(f"{kind} run {run_id} is running in another delivery")
        if run.status != "succeeded":
            detail = run.error.splitlines()[0] if run.error else run.status
            raise StageFailed(f"{kind} run {run_id} {status or run.status}: {detail}")
        return dict(run.result)


def answers_length(db: Session, snapshot: int, recent: int = 500) -> int | None:
    """The longest `max_new_tokens` the latest compared answers were sampled with (None: unknown)."""
    samplings = db.scalars(
        select(Response.sampling)
        .join(
            Comparison,
            or_(Comparison.chosen_response_id == Response.id, Comparison.rejected_response_id == Response.id),
        )
        .where(Comparison.id <= snapshot)
        .order_by(Comparison.id.desc())
        .limit(recent)
    )
    lengths = [int(s["max_new_tokens"]) for s in samplings if isinstance(s, dict) and s.get("max_new_tokens")]
    return max(lengths) if lengths else None


def execute_round(round_id: int, sessions: sessionmaker[Session] | None = None) -> str:
    """Drive one round to its end; returns the round's final status.

    Whatever a stage raises ends the round with the reason recorded: a round left active would make
    every later round wait for it (409) until a person edited the database.
    """
    sessions = sessions or session_factory()
    try:
        return _drive_round(round_id, sessions)
    except Exception as exc:
        log.exception("round %s stopped by an unexpected error", round_id)
        return _end_after_unexpected_error(sessions, round_id, exc)


def _end_after_unexpected_error(sessions: sessionmaker[Session], round_id: int, exc: Exception) -> str:
    """Fail the round (unless it already ended) and the runs of it still queued or running."""
    with sessions() as db:
        db.rollback()
        round_ = db.get(Round, round_id)
        if round_ is None:
            return "missing"
        if round_.status not in ("queued", "running"):
            return round_.status
        where = "before its first stage" if round_.stage in ("queued", "running") else f"at {round_.stage}"
        error = f"the round stopped {where}: {type(exc).__name__}: {exc}"
        for run in db.scalars(
            select(Run).where(Run.round_id == round_id, Run.status.in_(("queued", "running")))
        ):
            run.status, run.finished_at = "failed", utcnow()
            run.error = f"its round ended: {error}"
        finish_round(db, round_, "failed", error=error)
        return "failed"


def _drive_round(round_id: int, sessions: sessionmaker[Session]) -> str:
    settings = get_settings()
    with sessions() as db:
        round_ = db.get(Round, round_id)
        if round_ is None or round_.status not in ("queued", "running"):
            return round_.status if round_ else "missing"
        try:
            spec = RoundSpec.model_validate(round_.config).root
        except ValidationError as exc:
            error = f"the round's stored settings are not a valid round spec: {describe_problems(exc)}"
            finish_round(db, round_, "failed", error=error)
            return "failed"
        # Only a queued round becomes running, so one cancelled meanwhile stays cancelled. A round
        # already running is a redelivery after a lost worker (or a duplicate send) and resumes:
        # its runs' claims keep a stage a live worker holds with that worker.
        db.execute(
            update(Round).where(Round.id == round_id, Round.status == "queued").values(status="running")
        )
        db.commit()
        if round_.status != "running":
            return round_.status
        algorithm, snapshot = spec.algorithm, round_.comparison_snapshot
        start = db.get(Policy, round_.base_policy_id) if round_.base_policy_id is not None else None
        if start is None:
            raise StageFailed("the policy the round starts from is no longer registered")
        start_version = start.version
    # The split changes with the round, so over rounds every prompt also trains a policy.
    split = {"judge_share": spec.gate.judge_share, "seed": round_id}
    # The length the policy learnt at: PPO's rollouts, or the task pool's answers DPO learnt from.
    if algorithm == "ppo":
        training_length = spec.policy.sampling.max_new_tokens
    else:
        with sessions() as db:
            training_length = answers_length(db, snapshot) or settings.refill_max_new_tokens
    # The training stages (reward, judge, policy) run on the processes the spec asks for.
    processes = spec.processes.model_dump(mode="json")
    reward_config = {
        "comparison_snapshot": snapshot,
        "policy_version": start_version,
        "reward": spec.reward.model_dump(mode="json"),
        "processes": processes,
    }
    try:
        reward = _stage(
            sessions,
            round_id,
            "reward",
            {**reward_config, "comparison_split": {**split, "side": "policy"}},
            reward_body(sessions, settings),
        )
        if algorithm == "ppo":
            # A reward model no better than chance gives PPO only noise to climb (DPO does not use it).
            problem = reward_model_problem(reward, spec.reward.above_chance_alpha)
            if problem is not None:
                raise StageFailed(problem)
        judge = _stage(
            sessions,
            round_id,
            "judge",
            {**reward_config, "comparison_split": {**split, "side": "judge"}},
            reward_body(sessions, settings),
        )
        trained = _stage(
            sessions,
            round_id,
            algorithm,
            {
                "algorithm": algorithm,
                "policy_version": start_version,
                "comparison_snapshot": snapshot,
                "comparison_split": {**split, "side": "policy"},
                "reward_model_id": reward["reward_model_id"],
                "policy": spec.policy.model_dump(mode="json"),
                "processes": processes,
            },
            policy_body(sessions, settings),
        )
        if trained.get("rejected_reason"):
            raise StageFailed(f"candidate rejected during training: {trained['rejected_reason']}")
        candidate_version = trained["policy_version"]
        evaluation = _stage(
            sessions,
            round_id,
            "evaluate",
            {
                "candidate_version": candidate_version,
                "baseline_version": start_version,
                "judge_model_id": judge["reward_model_id"],
                "judge_comparisons": judge.get("comparisons"),
                "max_new_tokens": training_length,
                "gate": spec.gate.model_dump(mode="json"),
            },
            evaluation_body(sessions, settings),
        )
    except OwnedElsewhere as exc:
        log.info("round %s: %s; this delivery stops", round_id, exc)
        return "running"
    except StageFailed as exc:
        with sessions() as db:
            current = db.get(Round, round_id)
            cancelled = current.status == "cancelled"
            if not cancelled:
                finish_round(db, current, "failed", error=str(exc))
        return "cancelled" if cancelled else "failed"

    with sessions() as db:
        round_ = db.get(Round, round_id)
        round_.gate = {
            **(round_.gate or {}),
            "mode": spec.gate.mode,
            "judge": {k: v for k, v in evaluation.items() if k != "samples"},
            "judge_comparisons": judge.get("comparisons"),
            "policy_comparisons": reward.get("comparisons"),
        }
        db.commit()
        if not evaluation.get("passed"):
            reasons = "; ".join(evaluation.get("reasons", [])) or "gate not passed"
            finish_round(
                db, round_, "failed", error=f"candidate v{candidate_version} rejected by the gate: {reasons}"
            )
            return "failed"
        if spec.gate.mode == "human":
            candidate = db.scalar(select(Policy).where(Policy.version == candidate_version))
            try:
                open_arena(
                    db,
                    round_,
                    candidate,
                    db.get(Policy, round_.base_policy_id),
                    spec.gate.model_dump(),
                    training_length,
                    settings,
                )
            except Exception as exc:
                log.exception("round %s: opening the arena for v%s failed", round_id, candidate_version)
                db.rollback()
                error = f"the arena for v{candidate_version} could not be opened: {type(exc).__name__}: {exc}"
                finish_round(db, db.get(Round, round_id), "failed", error=error)
                return "failed"
            log.info("round %s: v%s passed the checks and waits for arena votes", round_id, candidate_version)
            return "awaiting_votes"
        if not spec.auto_promote:
            round_.stage = "awaiting_approval"
            finish_round(db, round_, "awaiting_approval")
            return "awaiting_approval"
        round_.stage = "promote"
        db.commit()
        try:
            promote(db, candidate_version, settings)  # refills the task pool with the new version too
        except Exception as exc:
            # Left active, the round would refuse every later one; it ends, naming the failure.
            db.rollback()
            failure = record_failure(log, exc, f"round {round_id}: promoting v{candidate_version} failed")
            error = f"promoting v{candidate_version} failed: {failure}"
            finish_round(db, db.get(Round, round_id), "failed", error=error)
            return "failed"
        finish_round(db, round_, "succeeded")
    log.info("round %s succeeded: v%s is live", round_id, candidate_version)
    return "succeeded"
