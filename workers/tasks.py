"""Thin Celery tasks: they receive ids, claim rows and call plain functions (DESIGN.md §5, §7).

torch and the trainers are imported inside task bodies so the prefork parent never touches CUDA.
"""

from __future__ import annotations

import logging

from app.db import session_scope
from workers.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(name="workers.tasks.periodic_maintenance")
def periodic_maintenance() -> dict[str, int]:
    """Beat: return expired assignments to the pool; re-queue runs whose worker died; refill the pool."""
    from app.assignment import expire_stale_assignments
    from workers.progress import requeue_stale_runs
    from workers.runs import enqueue_run

    with session_scope() as db:
        expired = expire_stale_assignments(db)
        requeued = requeue_stale_runs(db, enqueue_run)
    if expired:
        log.info("expired %d stale assignments", expired)
    if requeued:
        log.warning("re-queued runs whose worker was lost: %s", requeued)
    refill_run = _refill_task_pool()
    return {"expired_assignments": expired, "requeued_runs": len(requeued), "refill_run": refill_run or 0}


def _refill_task_pool() -> int | None:
    """Queue a generation run when the pool of tasks with free slots runs low (app/tasks_pool.py)."""
    from app.tasks_pool import refill_if_low

    with session_scope() as db:
        run_id = refill_if_low(db)  # commits the run row, then enqueues generate_responses
    if run_id is not None:
        log.info("task pool is low: generation run %s queued", run_id)
    return run_id


# ---------------------------------------------------------------- generation (gpu queue)


@celery_app.task(name="workers.tasks.generate_responses")
def generate_responses(run_id: int) -> str | None:
    """Sample K responses per prompt from the live policy and create rank (and arena) tasks."""
    from app.tasks_pool import run_generation

    return run_generation(run_id)


# ---------------------------------------------------------------- training (gpu queue)


@celery_app.task(name="workers.tasks.train_reward_model")
def train_reward_model(run_id: int) -> str | None:
    """Train a Bradley-Terry reward model for a run row of kind 'reward'."""
    from workers.runs import execute_reward_run

    return execute_reward_run(run_id)


@celery_app.task(name="workers.tasks.train_policy")
def train_policy(run_id: int) -> str | None:
    """Train a candidate policy (PPO-max or DPO, from the run's config) and register it."""
    from workers.runs import execute_policy_run

    return execute_policy_run(run_id)


@celery_app.task(name="workers.tasks.evaluate_policy")
def evaluate_policy(run_id: int) -> str | None:
    """Evaluate a candidate against a baseline on held-out prompts and apply the gate."""
    from workers.runs import execute_evaluation_run

    return execute_evaluation_run(run_id)


@celery_app.task(name="workers.tasks.run_round")
def run_round(round_id: int) -> str:
    """Drive a round through all of its stages."""
    from workers.rounds import execute_round

    return execute_round(round_id)


# ---------------------------------------------------------------- exports (default queue)


@celery_app.task(name="workers.tasks.export_dataset")
def export_dataset(run_id: int) -> str | None:
    """Write a researcher export (one zip under DATA_DIR/exports) for an export run row."""
    from app.exports.jobs import run_export_job

    return run_export_job(run_id)
