"""Generation runs with the tiny model: K responses per prompt with policy version and sampling
recorded, rank and arena tasks, and the refill trigger."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from app.data.db import session_factory
from app.data.models import Policy, Response, Run, Task, TaskResponse
from app.services.prompt_sets import create_prompt_set
from app.services.registry import init_base_policy
from app.services.tasks_pool import (
    claimable_task_count,
    refill_if_low,
    request_refill,
)
from tests.annotating import next_task
from tests.world import World
from workers.runs.generation import run_generation

PROMPTS = [
    "What is a prime number?",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Name three colours.",
]


@pytest.fixture
def live(db, settings, tiny_model_dir):
    policy, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    data = "\n".join(json.dumps({"prompt": p}) for p in PROMPTS).encode()
    create_prompt_set(db, name="gen", data=data, filename="gen.jsonl", eval_fraction=0.0)
    return policy


def test_generation_run_samples_k_responses_and_creates_rank_tasks(db, engine, settings, live):
    run_id = request_refill(db, n_prompts=3, max_new_tokens=6, seed=11, settings=settings, enqueue=False)
    run = db.get(Run, run_id)
    assert (run.kind, run.status) == ("generate", "queued")
    assert run.config["policy_version"] == live.version and len(run.config["prompt_ids"]) == 3

    assert run_generation(run_id, session_factory(engine), settings) == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.status == "succeeded" and run.progress == 1.0
    k = settings.responses_per_task
    responses = db.scalars(select(Response)).all()
    assert len(responses) == 3 * k
    for r in responses:
        assert r.policy_id == live.id
        assert r.sampling["policy_version"] == live.version and r.sampling["seed"] == 11
        assert (r.sampling["temperature"], r.sampling["top_p"], r.sampling["max_new_tokens"]) == (0.8, 0.9, 6)
        assert r.sampling["repetition_penalty"] == 1.1
        assert 1 <= r.token_count <= 6
    tasks = db.scalars(select(Task)).all()
    assert run.result["rank_tasks"] == len(tasks) >= 1
    assert run.result["rank_tasks"] + run.result["skipped_prompts"] == 3
    assert run.result["engine"] == "builtin"  # auto, on a host without vLLM or a CUDA GPU
    for task in tasks:
        assert task.kind == "rank" and task.required_annotations == settings.task_overlap
        texts = [item.response.text for item in task.items]
        assert 2 <= len(texts) <= k and len(set(texts)) == len(texts)  # identical samples shown once
    # A redelivered message finds the run finished and does nothing.
    assert run_generation(run_id, session_factory(engine), settings) is None
    assert db.scalar(select(func.count(Response.id))) == 3 * k


def test_arena_tasks_pair_two_versions_blind(db, engine, settings, live, make_user):
    # A second version with the same weights is enough to check the pairing.
    other = Policy(
        version=live.version + 1, kind="ppo", path=live.path, sha256=live.sha256, parent_id=live.id
    )
    db.add(other)
    db.commit()
    run_id = request_refill(
        db,
        policy_version=other.version,
        arena_against=live.version,
        n_prompts=4,
        max_new_tokens=5,
        settings=settings,
        enqueue=False,
    )
    config = db.get(Run, run_id).config
    assert len(config["arena_prompt_ids"]) == 1 and len(config["prompt_ids"]) == 3
    assert config["arena_versions"] == [other.version, live.version]
    assert run_generation(run_id, session_factory(engine), settings) == "succeeded"
    db.expire_all()
    (arena,) = db.scalars(select(Task).where(Task.kind == "arena")).all()
    policies = {item.response.policy_id for item in arena.items}
    assert policies == {other.id, live.id}
    view = next_task(db, make_user()[0].id, 600, kinds=["arena"])  # what an annotator sees
    assert view.id == arena.id
    assert len(view.responses) == 2 and not hasattr(view.responses[0], "policy_id")


def test_refill_triggers_below_the_configured_level(db, settings, live):
    low = settings.model_copy(update={"refill_below": 3, "refill_prompts": 2})
    World(db).tasks_from_texts([("q", ["a", "b"]), ("r", ["c", "d"])], required=1)
    assert claimable_task_count(db) == 2
    run_id = refill_if_low(db, low, enqueue=False)
    assert run_id is not None
    assert len(db.get(Run, run_id).config["prompt_ids"]) == 2
    assert refill_if_low(db, low, enqueue=False) is None  # one generation run at a time
    db.get(Run, run_id).status = "succeeded"
    db.commit()
    enough = settings.model_copy(update={"refill_below": 2})
    assert refill_if_low(db, enough, enqueue=False) is None  # the pool is not low
    assert refill_if_low(db, low, enqueue=False) is not None
    assert db.scalar(select(func.count(TaskResponse.task_id))) == 4
