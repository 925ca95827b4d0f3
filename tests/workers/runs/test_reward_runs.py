"""Reward runs end to end: the run row's lifecycle, a real worker, and a real SIGKILL mid-run."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from app.data.models import Comparison, RewardModel, Run, RunMetric
from app.services.registry import init_base_policy
from app.services.runs import create_run
from tests.world import World, marker_preferences
from workers.runs.training import execute_reward_run

FAST = {
    "epochs": 2,
    "max_pairs_per_batch": 2,
    "learning_rate": 3e-3,
    "eval_fraction": 0.25,
    "checkpoint_every": 2,
    "log_every": 1,
    "max_length": 64,
}


def _snapshot(db) -> int:
    return db.scalar(select(func.max(Comparison.id)))


def _reward_run(db, reward_settings) -> int:
    run = create_run(db, "reward", {"comparison_snapshot": _snapshot(db), "reward": reward_settings})
    db.commit()
    return run.id


def test_a_reward_run_records_metrics_and_registers_the_model(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=12)
    run_id = _reward_run(db, FAST)
    assert execute_reward_run(run_id, session_factory(engine)) == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.status == "succeeded" and run.progress == 1.0 and run.attempts == 1
    assert not (settings.runs_dir / str(run_id) / "checkpoints").exists()  # only needed to resume
    model = db.get(RewardModel, run.result["reward_model_id"])
    assert model.comparison_snapshot == _snapshot(db)
    assert {"val_accuracy", "reward_mean", "reward_std"} <= set(model.metrics)
    names = set(db.scalars(select(RunMetric.name).where(RunMetric.run_id == run_id)))
    assert {"train_loss", "val_accuracy"} <= names
    # A redelivered message finds the row finished and does nothing.
    assert execute_reward_run(run_id, session_factory(engine)) is None


def test_unknown_settings_fail_the_run_with_a_clear_error(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3)
    run_id = _reward_run(db, {"learning_rte": 1e-3})
    assert execute_reward_run(run_id, session_factory(engine)) == "failed"
    db.expire_all()
    assert "reward.learning_rte: Extra inputs are not permitted" in db.get(Run, run_id).error


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_killed_worker_resumes_the_run_from_its_checkpoint(
    settings, db, tiny_model_dir, celery_worker, monkeypatch
):
    """A worker SIGKILLed mid-run: maintenance re-queues the stale run, a new worker resumes it from the
    last checkpoint and ends at the same step count, with no duplicate metric rows."""
    from app.broker import send_task
    from app.config import reset_settings

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=48)
    # Enough steps (a few seconds of training) to kill the worker after the first checkpoint.
    reward_settings = FAST | {"epochs": 8, "checkpoint_every": 10}
    # Short heartbeats so a dead worker is noticed within seconds; the slow-down gives a window to kill in.
    env = {"PREFLOOP_RUN_HEARTBEAT_SECONDS": "0.5", "PREFLOOP_RUN_STALE_SECONDS": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    first = celery_worker("gpu", extra_env=env)
    run_id = _reward_run(db, reward_settings)
    send_task("workers.tasks.train_reward_model", args=[run_id])

    checkpoints = settings.runs_dir / str(run_id) / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.startswith("step-") for p in checkpoints.glob("*")):
        time.sleep(0.2)
    assert any(p.name.startswith("step-") for p in checkpoints.glob("*")), first.log()
    first.kill_hard()
    db.expire_all()
    assert db.get(Run, run_id).status == "running"  # the dead worker could not record anything

    second = celery_worker("gpu", extra_env=env)
    time.sleep(3.5)  # let the heartbeat go stale
    from app.services.runs import requeue_stale_runs

    assert requeue_stale_runs(db) == [run_id]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        db.expire_all()
        if db.get(Run, run_id).status not in ("queued", "running"):
            break
        time.sleep(0.5)
    run = db.get(Run, run_id)
    assert run.status == "succeeded", run.error + second.log()
    assert run.attempts == 2

    # The same data and settings without a kill end at the same step with the same held-out accuracy.
    from app.data.db import session_factory
    from workers.runs.training import execute_reward_run

    uninterrupted = _reward_run(db, reward_settings)
    assert execute_reward_run(uninterrupted, session_factory(db.get_bind())) == "succeeded"
    db.expire_all()
    reference = db.get(Run, uninterrupted).result
    assert run.result["steps"] == reference["steps"]
    assert run.result["val_accuracy"] == pytest.approx(reference["val_accuracy"])
    last_step = db.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == run_id))
    assert last_step == reference["steps"]
    duplicates = db.execute(
        select(RunMetric.step, RunMetric.name, func.count())
        .where(RunMetric.run_id == run_id)
        .group_by(RunMetric.step, RunMetric.name)
        .having(func.count() > 1)
    ).all()
    assert duplicates == []
