"""Promote and roll back: the alias moves, and only a real change finishes a round and refills the pool."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select

from app.data.models import PolicyAlias, Round, Run
from app.services.promotion import promote, rollback
from app.services.prompt_sets import create_prompt_set
from app.services.registry import RegistryError, init_base_policy, live_policy, publish_policy


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, list]]:
    """The tasks the services enqueue, recorded instead of sent."""
    calls: list[tuple[str, list]] = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: calls.append((name, args)))
    return calls


@pytest.fixture
def two_versions(db, settings, tiny_model_dir):
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    candidate = publish_policy(
        db,
        lambda d: shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True),
        kind="ppo",
        parent=base,
        status="candidate",
        settings=settings,
    )
    data = "\n".join(json.dumps({"prompt": f"question {i}?"}) for i in range(4)).encode()
    create_prompt_set(db, name="pool", data=data, filename="pool.jsonl", eval_fraction=0.0)
    return base, candidate


def _refills(db) -> list[Run]:
    db.expire_all()
    return list(db.scalars(select(Run).where(Run.kind == "generate").order_by(Run.id)))


def test_promote_moves_the_alias_and_refills_with_arena_tasks_against_the_previous(
    db, settings, two_versions, sent
):
    base, candidate = two_versions
    promotion = promote(db, candidate.version, settings)
    assert promotion.changed and promotion.previous.id == base.id
    assert live_policy(db).id == candidate.id and candidate.status == "approved"
    (refill,) = _refills(db)
    assert promotion.refill_run_id == refill.id and promotion.refill_error == ""
    assert refill.config["policy_version"] == candidate.version
    assert refill.config["arena_versions"] == [candidate.version, base.version]
    assert sent == [("workers.tasks.generate_responses", [refill.id])]


def test_promoting_the_live_version_again_refills_nothing(db, settings, two_versions, sent):
    base, _ = two_versions
    promotion = promote(db, base.version, settings)
    assert not promotion.changed and promotion.refill_run_id is None
    assert _refills(db) == [] and sent == []


def test_rollback_refills_with_the_version_live_again_and_no_arena(db, settings, two_versions, sent):
    base, candidate = two_versions
    promote(db, candidate.version, settings)
    promotion = rollback(db, settings)
    assert promotion.changed and promotion.policy.id == base.id and promotion.previous.id == candidate.id
    assert db.get(PolicyAlias, "live").policy_id == base.id
    first, second = _refills(db)
    assert (first.config["policy_version"], second.config["policy_version"]) == (
        candidate.version,
        base.version,
    )
    assert second.config["arena_versions"] == []  # nothing against the version taken down


def test_rollback_without_a_previous_version_says_so(db, settings, tiny_model_dir, sent):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    with pytest.raises(RegistryError, match="no previous live version"):
        rollback(db, settings)
    assert _refills(db) == []


def test_a_rejected_version_never_goes_live_and_refills_nothing(db, settings, two_versions, sent):
    base, candidate = two_versions
    candidate.status = "rejected"
    db.commit()
    with pytest.raises(RegistryError, match="rejected"):
        promote(db, candidate.version, settings)
    assert live_policy(db).id == base.id and _refills(db) == []


def test_promoting_a_candidate_awaiting_approval_finishes_its_round(db, settings, two_versions, sent):
    _, candidate = two_versions
    round_ = Round(algorithm="ppo", status="awaiting_approval", stage="awaiting_approval", active=None)
    db.add(round_)
    db.flush()
    candidate.round_id = round_.id
    db.commit()
    promote(db, candidate.version, settings)
    db.expire_all()
    assert (db.get(Round, round_.id).status, db.get(Round, round_.id).stage) == ("succeeded", "succeeded")


def test_a_refill_that_cannot_be_queued_leaves_the_promotion_in_place(
    db, settings, two_versions, monkeypatch
):
    def broker_down(name, args):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr("app.services.dispatch._sender", broker_down)
    base, candidate = two_versions
    promotion = promote(db, candidate.version, settings)
    assert promotion.refill_error == "broker unreachable" and promotion.refill_run_id is None
    db.expire_all()
    assert live_policy(db).id == candidate.id
