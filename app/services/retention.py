"""What may be deleted from the data dir, and deleting it (beat, hourly; `prefloop cleanup`).

Nothing else ever deletes, so without this the disk fills up. Deleted, by the PREFLOOP_* settings:
- export archives (`exports/*.zip`) written more than EXPORT_RETENTION_DAYS ago (0: kept);
  their runs stay listed and a download answers 410 "no longer on disk";
- checkpoints of failed and cancelled runs, FAILED_CHECKPOINT_RETENTION_HOURS after the run ended
  (a failed run is never resumed: a round starts a new run for the stage);
- half-written archives (`*.zip-partial`) and work folders (`.*.partial-*`) older than
  PARTIAL_FILE_RETENTION_HOURS, left by an export whose worker died;
- folders of rejected candidate policies beyond the newest KEEP_REJECTED_CANDIDATES (their rows
  stay, for the record; a rejected version can never go live).
Never the live or the previous policy. `plan_cleanup` only looks; `apply_cleanup` deletes what a plan
lists.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import Policy, PolicyAlias, Run, utcnow

log = logging.getLogger(__name__)

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Doomed:
    """One file or folder that may go, with why."""

    path: Path
    kind: str  # export | partial | checkpoints | candidate
    size: int
    reason: str


@dataclass
class CleanupResult:
    deleted: list[Doomed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(item.size for item in self.deleted)


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _older_than(path: Path, seconds: float, now: float) -> bool:
    """Whether nothing in `path` (a file, or a folder and everything under it) was written for `seconds`:
    an export still writing into its work folder keeps it young."""
    try:
        last = max(
            [path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))]
            if path.is_dir()
            else [path.stat().st_mtime]
        )
    except FileNotFoundError:
        return False
    return now - last > seconds


def _export_files(settings: Settings, now: float) -> list[Doomed]:
    exports = settings.exports_dir
    if not exports.is_dir():
        return []
    found = []
    if settings.export_retention_days > 0:
        limit = settings.export_retention_days * DAY
        for path in sorted(exports.glob("*.zip")):
            if _older_than(path, limit, now):
                reason = f"export archive older than {settings.export_retention_days:g} days"
                found.append(Doomed(path, "export", size_of(path), reason))
    limit = settings.partial_file_retention_hours * HOUR
    # An export whose worker died leaves its half-packed archive, or the folder it was writing into.
    leftovers = sorted({*exports.glob(".*.zip-partial"), *exports.glob(".*.partial-*")})
    for path in leftovers:
        if _older_than(path, limit, now):
            reason = f"half-written archive older than {settings.partial_file_retention_hours:g} hours"
            found.append(Doomed(path, "partial", size_of(path), reason))
    return found


def _failed_checkpoints(db: Session, settings: Settings) -> list[Doomed]:
    cutoff = utcnow() - timedelta(hours=settings.failed_checkpoint_retention_hours)
    runs = db.execute(
        select(Run.id, Run.status)
        .where(Run.status.in_(("failed", "cancelled")), Run.finished_at < cutoff)
        .order_by(Run.id)
    ).all()
    found = []
    for run_id, run_status in runs:
        path = settings.runs_dir / str(run_id) / "checkpoints"
        if path.is_dir():
            found.append(
                Doomed(path, "checkpoints", size_of(path), f"checkpoints of {run_status} run {run_id}")
            )
    return found


def _rejected_candidates(db: Session, settings: Settings) -> list[Doomed]:
    alias = db.get(PolicyAlias, "live")
    protected = {alias.policy_id, alias.previous_policy_id} if alias else set()
    rejected = db.execute(
        select(Policy.id, Policy.version, Policy.path)
        .where(Policy.status == "rejected")
        .order_by(Policy.version.desc())
        .offset(settings.keep_rejected_candidates)
    ).all()
    registry = settings.registry_dir.resolve()
    found = []
    for policy_id, version, folder in rejected:
        path = Path(folder)
        # Only folders inside the registry: a row pointing elsewhere is not ours to delete.
        if policy_id in protected or not path.is_dir() or registry not in path.resolve().parents:
            continue
        reason = f"rejected candidate v{version}, older than the newest {settings.keep_rejected_candidates}"
        found.append(Doomed(path, "candidate", size_of(path), reason))
    return found


def plan_cleanup(db: Session, settings: Settings) -> list[Doomed]:
    """Everything the retention settings allow to delete now; deletes nothing."""
    now = time.time()
    return [
        *_export_files(settings, now),
        *_failed_checkpoints(db, settings),
        *_rejected_candidates(db, settings),
    ]


def apply_cleanup(plan: list[Doomed]) -> CleanupResult:
    """Delete what the plan lists; a failure is recorded and the rest goes on."""
    result = CleanupResult()
    for item in plan:
        try:
            if item.path.is_dir():
                shutil.rmtree(item.path)
            elif item.path.exists():
                os.unlink(item.path)
            else:
                continue  # gone meanwhile
        except OSError as exc:
            result.errors.append(f"{item.path}: {exc}")
            log.warning("could not delete %s: %s", item.path, exc)
            continue
        result.deleted.append(item)
    if result.deleted:
        log.info("deleted %d items, %d bytes freed", len(result.deleted), result.freed_bytes)
    return result


# ---------------------------------------------------------------- free space


class LowDiskSpace(RuntimeError):
    """Too little free space in the data dir to start a run; the message says what to do."""


def free_bytes(path: Path) -> int:
    """Free bytes for us on the filesystem of `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_disk(settings: Settings) -> None:
    """Raise LowDiskSpace when the data dir's disk has less than PREFLOOP_MIN_FREE_DISK_GB free."""
    if settings.min_free_disk_gb <= 0:
        return
    free = free_bytes(settings.resolved_data_dir)
    needed = settings.min_free_disk_gb * 1e9
    if free < needed:
        raise LowDiskSpace(
            f"only {free / 1e9:.1f} GB free in {settings.resolved_data_dir} (runs need at least "
            f"{settings.min_free_disk_gb:g} GB, PREFLOOP_MIN_FREE_DISK_GB): see what can go with "
            "`prefloop cleanup --dry-run` and delete it with `prefloop cleanup`, free space on that "
            "disk, or move PREFLOOP_DATA_DIR to a larger one"
        )
