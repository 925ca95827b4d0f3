"""The model registry: atomic publish, one live alias, promote and roll back, wake-up messages."""

from __future__ import annotations

import shutil
import threading

import pytest
from sqlalchemy import select

from app.common.files import sha256_folder
from app.data.models import Policy, PolicyAlias
from app.services.promotion import promote, rollback
from app.services.registry import (
    POLICY_CHANNEL,
    RegistryError,
    init_base_policy,
    live_policy,
    publish_policy,
)


def _copy_of(folder):
    return lambda dest: shutil.copytree(folder, dest, dirs_exist_ok=True)


def test_publish_writes_a_complete_hashed_folder_then_the_row(settings, db, tiny_model_dir):
    base, created = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    assert created and base.version == 0 and base.kind == "base"
    assert base.sha256 == sha256_folder(settings.registry_dir / "policies" / "0")
    candidate = publish_policy(
        db, _copy_of(base.path), kind="ppo", parent=base, status="candidate", settings=settings
    )
    assert candidate.version == 1 and candidate.parent_id == base.id
    assert live_policy(db).version == 0  # registering does not make it live
    assert not list((settings.registry_dir / "staging").iterdir())  # nothing left half-way


def test_a_failed_build_leaves_no_row_and_no_folder(settings, db, tiny_model_dir):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)

    def broken(dest):
        (dest / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError):
        publish_policy(db, broken, kind="ppo", settings=settings)
    assert db.scalar(select(Policy).where(Policy.version == 1)) is None
    assert sorted(p.name for p in (settings.registry_dir / "policies").iterdir()) == ["0"]


def test_promote_and_rollback_move_the_one_alias(settings, db, tiny_model_dir):
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    v1 = publish_policy(
        db, _copy_of(base.path), kind="ppo", parent=base, status="candidate", settings=settings
    )
    promote(db, v1.version, settings)
    assert live_policy(db).version == 1
    assert db.query(PolicyAlias).count() == 1
    back = rollback(db, settings).policy
    assert back.version == 0 and live_policy(db).version == 0


def test_a_rejected_candidate_cannot_go_live(settings, db, tiny_model_dir):
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    bad = publish_policy(db, _copy_of(base.path), kind="ppo", status="rejected", settings=settings)
    with pytest.raises(RegistryError, match="rejected"):
        promote(db, bad.version, settings)
    assert live_policy(db).version == 0


def test_rollback_without_history_says_so(settings, db, tiny_model_dir):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    with pytest.raises(RegistryError, match="no previous"):
        rollback(db, settings)


def test_promote_publishes_a_wake_up_on_redis(settings, db, tiny_model_dir, redis_url, monkeypatch):
    import redis

    from app.config import get_settings, reset_settings

    monkeypatch.setenv("PREFLOOP_REDIS_URL", redis_url)
    reset_settings()
    settings = get_settings()
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    v1 = publish_policy(db, _copy_of(base.path), kind="ppo", settings=settings)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(POLICY_CHANNEL)
    got = []
    listener = threading.Thread(
        target=lambda: got.append(pubsub.get_message(timeout=5) or pubsub.get_message(timeout=5))
    )
    listener.start()
    promote(db, v1.version, settings)
    listener.join()
    assert got and got[0] and got[0]["data"] == b"1"
    pubsub.close()
    client.close()
