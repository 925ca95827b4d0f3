"""A worker SIGKILLed while it trains a policy (PPO-max and DPO), as an OOM killer or a power cut would.

The run resumes on a new worker from its last checkpoint and ends at the same step as a run that was
never interrupted; the kill leaves no policy in the registry (no row, no folder), and the resumed run
registers exactly one, whose folder matches its recorded hash.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from app.common.files import sha256_folder
from app.data.models import Comparison, Policy, Run, RunMetric
from app.services.registry import init_base_policy, policies_dir
from app.services.runs import create_run, requeue_stale_runs
from tests.world import World, marker_preferences

PPO = {
    "steps": 10,
    "rollout_batch_size": 4,
    "mini_batch_size": 4,
    "learning_rate": 1e-4,
    "sampling": {"max_new_tokens": 8, "temperature": 1.0},
    "max_prompt_tokens": 64,
    "checkpoint_every": 2,
    # A random tiny model repeats itself: the collapse guards would stop the run, which is not the point.
    "guard_max_kl": None,
    "guard_max_length_ratio": None,
    "guard_min_length_ratio": None,
    "guard_max_repetition": None,
    "guard_min_eos_share": None,
}
DPO = {"epochs": 4, "batch_size": 2, "max_length": 64, "learning_rate": 1e-4, "checkpoint_every": 3}
REWARD = {"epochs": 1, "max_pairs_per_batch": 4, "max_length": 64, "learning_rate": 1e-3}
# Short heartbeats so a dead worker is noticed within seconds.
ENV = {"PREFLOOP_RUN_HEARTBEAT_SECONDS": "0.5", "PREFLOOP_RUN_STALE_SECONDS": "3"}


def _policy_run_config(db, engine, algorithm: str) -> dict:
    from app.data.db import session_factory
    from workers.runs.training import execute_reward_run

    snapshot = db.scalar(select(func.max(Comparison.id)))
    config = {"algorithm": algorithm, "comparison_snapshot": snapshot}
    if algorithm == "dpo":
        return config | {"policy": DPO}
    reward = create_run(db, "reward", {"comparison_snapshot": snapshot, "reward": REWARD})
    db.commit()
    assert execute_reward_run(reward.id, session_factory(engine)) == "succeeded"
    db.expire_all()
    return config | {"policy": PPO, "reward_model_id": db.get(Run, reward.id).result["reward_model_id"]}


def _registered(db) -> list[int]:
    db.expire_all()
    return sorted(db.scalars(select(Policy.version)))


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_a_policy_run_killed_mid_training_resumes_and_registers_one_whole_policy(
    algorithm, settings, engine, db, tiny_model_dir, celery_worker, monkeypatch
):
    from app.broker import send_task
    from app.config import reset_settings
    from app.data.db import session_factory
    from workers.runs.training import execute_policy_run

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=16, eval_prompts=0)
    config = _policy_run_config(db, engine, algorithm)

    first = celery_worker("gpu", extra_env=ENV)
    run = create_run(db, algorithm, config)
    db.commit()
    send_task("workers.tasks.train_policy", args=[run.id])
    checkpoints = settings.runs_dir / str(run.id) / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(p.name.startswith("step-") for p in checkpoints.glob("*")):
        time.sleep(0.05)
    assert any(p.name.startswith("step-") for p in checkpoints.glob("*")), first.log()
    first.kill_hard()

    db.expire_all()
    assert db.get(Run, run.id).status == "running", "the run ended before the kill: give it more steps"
    assert _registered(db) == [0]  # nothing half-written reached the registry
    assert sorted(p.name for p in policies_dir(settings).iterdir()) == ["0"]

    second = celery_worker("gpu", extra_env=ENV)
    time.sleep(3.5)  # the dead worker's heartbeat goes stale
    assert requeue_stale_runs(db) == [run.id]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        db.expire_all()
        if db.get(Run, run.id).status not in ("queued", "running"):
            break
        time.sleep(0.5)
    resumed = db.get(Run, run.id)
    assert resumed.status == "succeeded", resumed.error + second.log()[-4000:]
    assert resumed.attempts == 2
    assert _registered(db) == [0, 1]
    policy = db.scalar(select(Policy).where(Policy.version == 1))
    assert policy.source == f"run:{run.id}" and sha256_folder(policy.path) == policy.sha256
    last_step = db.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == run.id))
    duplicates = db.execute(
        select(RunMetric.step, RunMetric.name, func.count())
        .where(RunMetric.run_id == run.id)
        .group_by(RunMetric.step, RunMetric.name)
        .having(func.count() > 1)
    ).all()
    assert duplicates == []

    # It went on from a checkpoint, not from the start, and ends where a run without a kill ends.
    every = config["policy"]["checkpoint_every"]
    assert resumed.result["resumed_from_step"] >= every and resumed.result["resumed_from_step"] % every == 0
    reference = create_run(db, algorithm, config)
    db.commit()
    assert execute_policy_run(reference.id, session_factory(engine)) == "succeeded"
    db.expire_all()
    reference_run = db.get(Run, reference.id)
    assert reference_run.result["resumed_from_step"] is None
    assert resumed.result["steps"] == reference_run.result["steps"]
    reference_step = db.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == reference.id))
    assert last_step == reference_step
