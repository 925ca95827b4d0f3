"""Thin Celery tasks: they receive ids and call run bodies (workers/runs/) or services.

Run bodies are imported inside their tasks: they are the way to torch and the trainers, which the
prefork parent (it imports this module) must never load, since CUDA does not survive a fork.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from app.config import get_settings
from app.data.db import session_scope
from app.services import dispatch
from app.services.assignment import expire_stale_assignments
from app.services.retention import apply_cleanup, plan_cleanup
from app.services.rounds import maybe_start_auto_round, resend_queued_rounds
from app.services.runs import requeue_stale_runs, resend_queued_runs
from app.services.tasks_pool import refill_if_low
from workers.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(name=dispatch.PERIODIC_MAINTENANCE)
def periodic_maintenance() -> dict[str, int]:
    """Beat: return expired assignments to the pool; re-queue runs whose worker died; send again runs
    and rounds queued long ago whose task never started (PREFLOOP_QUEUED_RESEND_SECONDS); refill the
    pool; start a round when enough new comparisons arrived (PREFLOOP_AUTO_ROUND_MIN_COMPARISONS,
    0 = off)."""
    unsent_after = timedelta(seconds=get_settings().queued_resend_seconds)
    with session_scope() as db:
        expired = expire_stale_assignments(db)
        requeued = requeue_stale_runs(db)
        resent_runs = resend_queued_runs(db, unsent_after)
        resent_rounds = resend_queued_rounds(db, unsent_after)
    if expired:
        log.info("expired %d stale assignments", expired)
    if requeued:
        log.warning("re-queued runs whose worker was lost: %s", requeued)
    if resent_runs or resent_rounds:
        log.warning(
            "sent again runs %s and rounds %s, queued with no task started", resent_runs, resent_rounds
        )
    with session_scope() as db:
        refill_run = refill_if_low(db)  # commits the run row, then enqueues the generation task
    if refill_run is not None:
        log.info("task pool is low: generation run %s queued", refill_run)
    with session_scope() as db:
        auto_round = maybe_start_auto_round(db, get_settings().auto_round_min_comparisons)
        auto_round_id = auto_round.id if auto_round is not None else 0
    if auto_round_id:
        log.info("enough new comparisons: round %s started", auto_round_id)
    return {
        "expired_assignments": expired,
        "requeued_runs": len(requeued),
        "resent_runs": len(resent_runs),
        "resent_rounds": len(resent_rounds),
        "refill_run": refill_run or 0,
        "auto_round": auto_round_id,
    }


@celery_app.task(name=dispatch.CLEANUP_DISK)
def cleanup_disk() -> dict[str, int]:
    """Beat, hourly: delete what the retention settings allow (app.services.retention)."""
    with session_scope() as db:
        plan = plan_cleanup(db, get_settings())
    result = apply_cleanup(plan)
    return {"deleted": len(result.deleted), "freed_bytes": result.freed_bytes, "errors": len(result.errors)}


# ---------------------------------------------------------------- gpu queue


@celery_app.task(name=dispatch.GENERATE_RESPONSES)
def generate_responses(run_id: int) -> str | None:
    """Sample K responses per prompt from the live policy and create rank (and arena) tasks."""
    from workers.runs.generation import run_generation

    return run_generation(run_id)


@celery_app.task(name=dispatch.TRAIN_REWARD_MODEL)
def train_reward_model(run_id: int) -> str | None:
    """Train a Bradley-Terry reward model for a run row of kind 'reward'."""
    from workers.runs.training import execute_reward_run

    return execute_reward_run(run_id)


@celery_app.task(name=dispatch.TRAIN_POLICY)
def train_policy(run_id: int) -> str | None:
    """Train a candidate policy (PPO-max or DPO, from the run's config) and register it."""
    from workers.runs.training import execute_policy_run

    return execute_policy_run(run_id)


@celery_app.task(name=dispatch.EVALUATE_POLICY)
def evaluate_policy(run_id: int) -> str | None:
    """Evaluate a candidate against a baseline on held-out prompts and apply the gate."""
    from workers.runs.training import execute_evaluation_run

    return execute_evaluation_run(run_id)


@celery_app.task(name=dispatch.RUN_ROUND)
def run_round(round_id: int) -> str:
    """Drive a round through all of its stages."""
    from workers.runs.rounds import execute_round

    return execute_round(round_id)


# ---------------------------------------------------------------- default queue


@celery_app.task(name=dispatch.EXPORT_DATASET)
def export_dataset(run_id: int) -> str | None:
    """Write a researcher export (one zip under DATA_DIR/exports) for an export run row."""
    from workers.runs.export import run_export_job

    return run_export_job(run_id)
