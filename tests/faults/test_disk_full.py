"""A full data disk (a real 64 MiB tmpfs, filled up) while a policy is published and an export is written.

Each failure must be clean: an error that says the disk is full, the live policy unchanged, and no
partial folder or file left where readers look (registry/policies, the exports folder) or in the
staging places beside them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.data.models import Comparison, Policy, Run
from app.services.registry import init_base_policy, live_policy, policies_dir, publish_policy
from tests.world import World, marker_preferences

PAGE = 4096


def _leftovers(root: Path) -> list[str]:
    """Hidden work folders and partial files anywhere under `root` (the filler aside)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name != ".filler" and (p.name.startswith(".") or "partial" in p.name or ".tmp-" in p.name)
    )


def test_publishing_a_policy_onto_a_full_disk_fails_cleanly(small_disk, db, tiny_model_dir):
    from app.config import get_settings

    settings = get_settings()
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    small_disk.fill(leave_bytes=4 * 1024 * 1024)  # less than the model's 16 MB

    def build(folder: Path) -> None:  # what a trainer's publish writes: the weights and tokenizer
        shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)

    with pytest.raises(OSError) as refused:
        publish_policy(db, build, kind="dpo", parent=base, status="candidate", settings=settings)
    assert "No space left on device" in str(refused.value)

    db.rollback()
    assert live_policy(db).id == base.id
    assert db.scalar(select(func.count()).select_from(Policy)) == 1
    assert sorted(p.name for p in policies_dir(settings).iterdir()) == ["0"]
    assert _leftovers(small_disk.path) == []
    # Space back: the same publish succeeds, as the next version.
    small_disk.unfill()
    assert (
        publish_policy(db, build, kind="dpo", parent=base, status="candidate", settings=settings).version == 1
    )


def test_a_policy_run_on_a_full_disk_fails_saying_so_and_registers_nothing(
    small_disk, engine, db, tiny_model_dir
):
    from app.config import get_settings
    from app.data.db import session_factory
    from app.services.runs import create_run
    from workers.runs.training import execute_policy_run

    settings = get_settings()
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=4, eval_prompts=0)
    snapshot = db.scalar(select(func.max(Comparison.id)))
    run = create_run(
        db,
        "dpo",
        {
            "algorithm": "dpo",
            "comparison_snapshot": snapshot,
            "policy": {"epochs": 1, "batch_size": 2, "max_length": 64, "learning_rate": 1e-4},
        },
    )
    db.commit()
    small_disk.fill(leave_bytes=64 * 1024)

    assert execute_policy_run(run.id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Run, run.id)
    assert failed.error.splitlines()[0].startswith("The disk is full"), failed.error[:500]
    assert live_policy(db).id == base.id
    assert db.scalar(select(func.count()).select_from(Policy)) == 1
    assert sorted(p.name for p in policies_dir(settings).iterdir()) == ["0"]
    assert _leftovers(small_disk.path) == []


def test_an_export_onto_a_full_disk_fails_saying_so_and_leaves_no_partial_file(
    small_disk, engine, db, tiny_model_dir
):
    from app.config import get_settings
    from app.data.db import session_factory
    from app.services.exports import ExportSpec
    from app.services.exports.jobs import create_export_run
    from workers.runs.export import run_export_job

    settings = get_settings()
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=40, eval_prompts=0)
    spec = ExportSpec(format="pairwise", file_format="parquet")  # stored uncompressed in the zip

    # Measured once with room to spare: what the export's work folder and its archive take.
    sessions = session_factory(engine)
    sized = create_export_run(db, spec, None)
    assert run_export_job(sized.id, sessions, settings) == "succeeded"
    db.expire_all()
    archive = Path(db.get(Run, sized.id).result["path"])
    archive_bytes = math.ceil(archive.stat().st_size / PAGE) * PAGE
    archive.unlink()

    # Room for the work folder but not for the archive beside it: the disk fills while packing.
    run = create_export_run(db, spec, None)
    small_disk.fill(leave_bytes=archive_bytes + archive_bytes // 2)
    assert run_export_job(run.id, sessions, settings) == "failed"
    db.expire_all()
    failed = db.get(Run, run.id)
    assert failed.error.splitlines()[0].startswith("The disk is full"), failed.error[:500]
    assert [p.name for p in settings.exports_dir.iterdir()] == []
    assert _leftovers(small_disk.path) == []
