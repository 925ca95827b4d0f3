"""Disk retention: what may go (and only that), the dry run, the hourly task, and no run on a full disk."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from app.config import get_settings, reset_settings
from app.data.models import Policy, PolicyAlias, Run, utcnow
from app.services.retention import LowDiskSpace, apply_cleanup, ensure_free_disk, plan_cleanup
from app.services.round_spec import RoundSpec
from app.services.rounds import RoundError, start_round
from app.services.runs import execute
from app.services.tasks_pool import refill_if_low

DAY = 24 * 3600


def _file(path, size: int, age_seconds: float = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_seconds:
        then = time.time() - age_seconds
        os.utime(path, (then, then))
    return path


def _old_folder(path, size: int, age_seconds: float):
    """A folder left behind by a dead export, last written `age_seconds` ago."""
    shard = _file(path / "data" / "train-00000.parquet", size, age_seconds)
    then = time.time() - age_seconds
    for folder in (shard.parent, path):
        os.utime(folder, (then, then))
    return path


def _recent_shard_in_old_folder(path):
    """An export still writing: its folder was made long ago, a shard inside was written just now."""
    _old_folder(path, 300, 7 * 3600)
    _file(path / "data" / "train-00001.parquet", 300)
    return path


def _policy(db, settings, version: int, status: str, size: int = 10) -> Policy:
    folder = settings.registry_dir / "policies" / str(version)
    _file(folder / "model.safetensors", size)
    policy = Policy(
        version=version, kind="base" if version == 0 else "dpo", path=str(folder), sha256="0" * 64
    )
    policy.status = status
    db.add(policy)
    db.commit()
    return policy


def _finished_run(db, status: str, hours_ago: float) -> Run:
    run = Run(kind="dpo", status=status, finished_at=utcnow() - timedelta(hours=hours_ago))
    db.add(run)
    db.commit()
    return run


@pytest.fixture
def littered(settings, db):
    """A data dir with something of every kind, old enough to go and recent enough to stay."""
    exports = settings.exports_dir
    live = _policy(db, settings, 0, "approved")
    db.add(PolicyAlias(name="live", policy_id=live.id))
    db.commit()
    rejected = [_policy(db, settings, v, "rejected", size=100) for v in range(1, 8)]  # v1 … v7
    old_failed = _finished_run(db, "failed", hours_ago=48)
    old_cancelled = _finished_run(db, "cancelled", hours_ago=30)
    recent_failed = _finished_run(db, "failed", hours_ago=1)
    old_succeeded = _finished_run(db, "succeeded", hours_ago=48)
    for run in (old_failed, old_cancelled, recent_failed, old_succeeded):
        _file(settings.runs_dir / str(run.id) / "checkpoints" / "step-4" / "state.pt", 1000)
    return {
        "doomed": {
            _file(exports / "export-000001-pairwise-parquet.zip", 5000, age_seconds=40 * DAY),
            _file(exports / ".export-000002-pairwise-parquet.zip.zip-partial", 700, age_seconds=7 * 3600),
            _old_folder(exports / ".export-000005-pairwise-parquet.zip.partial-0a1b2c3d", 300, 7 * 3600),
            settings.runs_dir / str(old_failed.id) / "checkpoints",
            settings.runs_dir / str(old_cancelled.id) / "checkpoints",
            settings.registry_dir / "policies" / "1",
            settings.registry_dir / "policies" / "2",
        },
        "kept": {
            _file(exports / "export-000003-pairwise-parquet.zip", 5000, age_seconds=2 * DAY),
            _file(exports / ".export-000004-pairwise-parquet.zip.zip-partial", 700, age_seconds=600),
            _recent_shard_in_old_folder(exports / ".export-000006-pairwise-parquet.zip.partial-4e5f6a7b"),
            settings.runs_dir / str(recent_failed.id) / "checkpoints",
            settings.runs_dir
            / str(old_succeeded.id)
            / "checkpoints",  # its resume state is not ours to judge
            *(settings.registry_dir / "policies" / str(v) for v in (0, 3, 4, 5, 6, 7)),
        },
        "rejected": rejected,
    }


def test_cleanup_deletes_what_retention_allows_and_nothing_else(settings, db, littered):
    plan = plan_cleanup(db, settings)
    assert {item.path for item in plan} == littered["doomed"]
    assert {item.kind for item in plan} == {"export", "partial", "checkpoints", "candidate"}
    assert sum(item.size for item in plan) == 5000 + 700 + 300 + 2 * 1000 + 2 * 100

    result = apply_cleanup(plan)
    assert result.freed_bytes == 8200 and result.errors == []
    assert not any(path.exists() for path in littered["doomed"])
    assert all(path.exists() for path in littered["kept"])
    assert len(db.scalars(select(Policy)).all()) == 8  # the rows stay, for the record
    assert plan_cleanup(db, settings) == []


def test_dry_run_lists_paths_and_bytes_and_deletes_nothing(settings, db, littered):
    from app.cli import main

    dry = CliRunner().invoke(main, ["cleanup", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    for path in littered["doomed"]:
        assert str(path) in dry.output and path.exists()
    assert "would delete 7 items, 8.2 KB" in dry.output
    assert "rejected candidate v1, older than the newest 5" in dry.output

    real = CliRunner().invoke(main, ["cleanup"])
    assert real.exit_code == 0, real.output
    assert "deleted 7 items, 8.2 KB freed" in real.output
    assert not any(path.exists() for path in littered["doomed"])


def test_the_hourly_task_cleans_up(settings, db, littered):
    from workers.celery_app import celery_app
    from workers.tasks import cleanup_disk

    assert celery_app.conf.beat_schedule["cleanup"]["task"] == "workers.tasks.cleanup_disk"
    assert cleanup_disk() == {"deleted": 7, "freed_bytes": 8200, "errors": 0}


@pytest.fixture
def disk_full(settings, monkeypatch):
    """More free space asked for than any disk has: the data dir's disk counts as full."""
    monkeypatch.setenv("PREFLOOP_MIN_FREE_DISK_GB", "1000000000")
    reset_settings()
    return get_settings()


def test_no_run_starts_on_a_full_disk_and_the_error_says_what_to_do(disk_full, db, client, api_headers):
    with pytest.raises(LowDiskSpace) as refused:
        ensure_free_disk(disk_full)
    message = str(refused.value)
    assert "GB free in" in message and "PREFLOOP_MIN_FREE_DISK_GB" in message
    assert "prefloop cleanup --dry-run" in message

    with pytest.raises(RoundError, match="the round was not started: only .* GB free"):
        start_round(db, RoundSpec.model_validate({}), enqueue=False)

    response = client.post("/api/exports", json={"format": "pairwise"}, headers=api_headers("researcher"))
    assert response.status_code == 507 and "prefloop cleanup" in response.json()["detail"]
    assert db.scalar(select(Run).where(Run.kind == "export")) is None

    # A run queued before the disk filled does not start either; it fails with the reason.
    queued = Run(kind="generate", status="queued", config={})
    db.add(queued)
    db.commit()
    assert execute(queued.id, lambda *args: pytest.fail("the body must not run")) == "failed"
    db.expire_all()
    assert db.get(Run, queued.id).error.startswith("not started: only ")


def test_beat_queues_no_refill_on_a_full_disk(disk_full, db, settings):
    live = _policy(db, disk_full, 0, "approved")
    db.add(PolicyAlias(name="live", policy_id=live.id))
    db.commit()
    assert refill_if_low(db, disk_full, enqueue=False) is None
    assert db.scalar(select(Run)) is None
