"""Redis (the Celery broker and the policy wake-ups) stopped while annotators work and a round runs.

A private Redis serves as broker for a real Celery worker; the web app runs in-process on the private
Postgres. Annotation never needs the broker, so it goes on. A round asked for while Redis is down is
stored as queued (not a 500) and is sent again by maintenance once Redis is back; a round already
running keeps training through an outage and finishes.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.data.models import Annotation, Round
from app.services.registry import init_base_policy, live_policy
from app.services.rounds import resend_queued_rounds
from tests.world import World, marker_preferences

ROUND = {
    "algorithm": "dpo",
    "reward": {"epochs": 1, "max_pairs_per_batch": 4, "max_length": 64, "learning_rate": 1e-3},
    # Enough DPO steps that the round is still training while Redis is down.
    "policy": {"epochs": 12, "batch_size": 2, "max_length": 64, "learning_rate": 1e-4},
    "gate": {
        "prompts": 2,
        "sampling": {"max_new_tokens": 8},
        "min_win_rate": 0.0,
        "max_kl": None,
        "max_length_ratio": None,
        "min_length_ratio": None,
    },
}
DOWN_SECONDS = 4.0


def _annotate_one(client, headers) -> int:
    """Ask for a task and rank it as shown; returns the submission's status code."""
    task = client.get("/api/tasks/next", headers=headers)
    assert task.status_code == 200, task.text
    body = task.json()
    ranking = [[r["id"]] for r in body["responses"]]
    return client.post(
        f"/api/tasks/{body['id']}/annotation", json={"ranking": ranking}, headers=headers
    ).status_code


def _wait_for(condition, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{log()[-4000:]}")


@pytest.fixture
def client(worker_env, engine):
    """The web app in-process with the settings worker_env switched to: the private Redis as broker."""
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.web.main import create_app

    with TestClient(create_app(get_settings(), engine)) as test_client:
        yield test_client


@pytest.mark.slow
def test_annotation_goes_on_and_a_round_waits_for_redis_then_finishes(
    settings, db, client, api_headers, tiny_model_dir, private_redis, celery_worker
):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=3)
    World(db).tasks_from_texts(
        [(f"outage prompt {i}", [f"a{i}", f"b{i}", f"c{i}"]) for i in range(8)], required=1
    )
    annotator, admin = api_headers("annotator"), api_headers("admin")
    worker = celery_worker("gpu,default")
    base_version = live_policy(db).version

    # Redis down: annotators keep working, health says what is down, a round request is kept.
    private_redis.stop()
    assert [_annotate_one(client, annotator) for _ in range(3)] == [201, 201, 201]
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["broker"].startswith("down")
    asked = client.post("/api/rounds", json=ROUND, headers=admin)
    assert asked.status_code == 201, asked.text
    round_id = asked.json()["id"]
    assert asked.json()["status"] == "queued"

    # Redis back: maintenance sends the round again and the worker takes it.
    private_redis.start()
    db.expire_all()
    assert resend_queued_rounds(db, timedelta(0)) == [round_id]

    def training() -> bool:
        db.expire_all()
        return db.get(Round, round_id).stage == "dpo"

    _wait_for(training, 240, "the round to reach its policy stage", worker.log)

    # Redis down again in the middle of training: the round goes on, and so does annotation.
    private_redis.stop()
    assert [_annotate_one(client, annotator) for _ in range(2)] == [201, 201]
    time.sleep(DOWN_SECONDS)
    db.expire_all()
    assert db.get(Round, round_id).status == "running", "the round ended before Redis came back"
    private_redis.start()

    def finished() -> Round | None:
        db.expire_all()
        round_ = db.get(Round, round_id)
        return round_ if round_.status not in ("queued", "running") else None

    round_ = _wait_for(finished, 300, "the round to finish", worker.log)
    assert round_.status == "succeeded", round_.error + worker.log()[-4000:]
    assert live_policy(db).round_id == round_id and live_policy(db).version > base_version
    # All five judgements made while Redis was away are stored.
    stored = db.scalar(select(func.count()).select_from(Annotation).where(Annotation.rationale == ""))
    assert stored >= 5
    assert worker.process.poll() is None, "the worker died during the outage"
