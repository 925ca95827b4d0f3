"""A round, executed in one gpu-queue task: reward model → policy → evaluation → promote → refill.

The round's RoundSpec is read back from its row; each stage is a run row of the round (one per kind)
that carries its section of the spec, executed inline with the usual lifecycle, so a redelivered
round skips the stages that already succeeded and resumes the one in progress from its checkpoint.
The round row records the stage it is at; the admin console reads it.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings
from app.data.db import session_factory
from app.data.models import Policy, Round, Run
from app.services.promotion import promote
from app.services.round_spec import RoundSpec, describe_problems
from app.services.rounds import finish_round
from app.services.runs import create_run, execute
from workers.runs.training import evaluation_body, policy_body, reward_body

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    pass


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
        if run.status != "succeeded":
            detail = run.error.splitlines()[0] if run.error else run.status
            raise StageFailed(f"{kind} run {run_id} {status or run.status}: {detail}")
        return dict(run.result)


def execute_round(round_id: int, sessions: sessionmaker[Session] | None = None) -> str:
    """Drive one round to its end; returns the round's final status."""
    sessions = sessions or session_factory()
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
        round_.status = "running"
        db.commit()
        algorithm, snapshot = spec.algorithm, round_.comparison_snapshot
        start = db.get(Policy, round_.base_policy_id)
        start_version = start.version
    try:
        reward = _stage(
            sessions,
            round_id,
            "reward",
            {
                "comparison_snapshot": snapshot,
                "policy_version": start_version,
                "reward": spec.reward.model_dump(mode="json"),
            },
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
                "reward_model_id": reward["reward_model_id"],
                "policy": spec.policy.model_dump(mode="json"),
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
                "reward_model_id": reward["reward_model_id"],
                "gate": spec.gate.model_dump(mode="json"),
            },
            evaluation_body(sessions, settings),
        )
    except StageFailed as exc:
        with sessions() as db:
            current = db.get(Round, round_id)
            cancelled = current.status == "cancelled"
            if not cancelled:
                finish_round(db, current, "failed", error=str(exc))
        return "cancelled" if cancelled else "failed"

    with sessions() as db:
        round_ = db.get(Round, round_id)
        if not evaluation.get("passed"):
            reasons = "; ".join(evaluation.get("reasons", [])) or "gate not passed"
            finish_round(
                db, round_, "failed", error=f"candidate v{candidate_version} rejected by the gate: {reasons}"
            )
            return "failed"
        if not spec.auto_promote:
            round_.stage = "awaiting_approval"
            finish_round(db, round_, "awaiting_approval")
            return "awaiting_approval"
        round_.stage = "promote"
        db.commit()
        promote(db, candidate_version, settings)  # refills the task pool with the new version too
        finish_round(db, round_, "succeeded")
    log.info("round %s succeeded: v%s is live", round_id, candidate_version)
    return "succeeded"
