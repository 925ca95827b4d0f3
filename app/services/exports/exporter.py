"""Running an export: stream rows from the database through a format into split writers, then write the
dataset card and, for the zip layout, pack the folder. The result appears atomically (a partial folder
is renamed into place only when complete), so a crashed or cancelled export never leaves a half file
where a finished one is expected."""

from __future__ import annotations

import json
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.db import is_postgres
from app.data.models import Policy, PromptSet
from app.services.exports.card import PolicyNote, render_card
from app.services.exports.formats import get_format
from app.services.exports.pseudonym import Pseudonymizer, key_id
from app.services.exports.rows import BuildContext, Format, RowMeta
from app.services.exports.source import DEFAULT_PAGE_SIZE, as_utc, count_tasks, iter_task_bundles
from app.services.exports.spec import ExportSpec
from app.services.exports.split import TEST, TRAIN, splitter
from app.services.exports.stats import ExportStats
from app.services.exports.writers import SplitWriter
from app.services.quality.gold import excluded_annotator_ids
from app.services.quality.leaderboard import export_leaderboard

Progress = Callable[[int, int, str], None]
SPLIT_ORDER = (TRAIN, TEST)


class ExportCancelled(Exception):
    """Raised when should_stop() answers true; nothing is left at the destination."""


@dataclass
class ExportResult:
    path: Path
    spec: ExportSpec
    stats: ExportStats
    splits: list[str]
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    pseudonym_key_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "layout": self.spec.layout,
            "format": self.spec.format,
            "file_format": self.spec.file_format,
            "splits": self.splits,
            "files": self.files,
            "bytes": self.bytes,
            "filters": self.spec.filter_summary(),
            "split": self.spec.split_summary(),
            "pseudonym_key_id": self.pseudonym_key_id,
            **self.stats.as_dict(),
        }


def begin_snapshot(db: Session) -> None:
    """On Postgres, read every page from one snapshot so counts and agreement describe one moment."""
    if is_postgres(db) and not db.in_transaction():
        db.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def text_prompt_renderer(
    db: Session, spec: ExportSpec
) -> Callable[[list[dict[str, str]]], tuple[str, str]] | None:
    """For pairwise_text with text_template=chat_template: the chosen policy's tokenizer renders prompts."""
    if spec.format != "pairwise_text" or spec.text_template != "chat_template":
        return None
    path = db.scalar(select(Policy.path).where(Policy.version == spec.chat_template_version))
    if path is None:
        raise ValueError(f"no policy version {spec.chat_template_version} to take a chat template from")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ValueError(f"policy version {spec.chat_template_version} has no chat template")

    def render(messages: list[dict[str, str]]) -> tuple[str, str]:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ""

    return render


def excluded_annotators(db: Session) -> set[int]:
    """Annotators the gold-task quality gate excludes from training data and exports (empty when off)."""
    return set(excluded_annotator_ids(db))


def iter_rows(
    db: Session,
    spec: ExportSpec,
    *,
    pseudonym_key: str,
    page_size: int = DEFAULT_PAGE_SIZE,
    on_task: Callable[[], None] | None = None,
    excluded_users: set[int] | None = None,
) -> Iterator[tuple[str, dict[str, Any], RowMeta]]:
    """(split, row, meta) for every row of the export, streamed page by page."""
    fmt = get_format(spec.format)
    ctx = BuildContext(spec, Pseudonymizer(pseudonym_key), text_prompt_renderer(db, spec))
    split_of = splitter(spec)
    if excluded_users is None:
        excluded_users = excluded_annotators(db)
    bundles = iter_task_bundles(
        db, spec, need_comparisons=fmt.needs_comparisons, page_size=page_size, excluded_users=excluded_users
    )
    for bundle in bundles:
        split = split_of(bundle.prompt)
        for row, meta in fmt.build(bundle, ctx):
            yield split, row, meta
        if on_task is not None:
            on_task()


def export_dataset(
    db: Session,
    spec: ExportSpec,
    dest: Path,
    *,
    pseudonym_key: str,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    overwrite: bool = False,
) -> ExportResult:
    """Write the export to `dest` (a folder, or a .zip for layout='zip') and return what was written."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists already; choose another output or allow overwriting")
    fmt = get_format(spec.format)
    begin_snapshot(db)
    excluded = excluded_annotators(db)
    total = count_tasks(db, spec, excluded)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    (work / "data").mkdir(parents=True)
    try:
        stats = ExportStats(excluded_annotators=len(excluded))
        writers = _stream_into(
            db,
            spec,
            fmt,
            work / "data",
            stats,
            total,
            pseudonym_key,
            progress,
            should_stop,
            page_size,
            excluded,
        )
        splits, files = [], []
        for split in SPLIT_ORDER:
            writer = writers.get(split)
            if writer is None:
                continue
            splits.append(split)
            files += [f"data/{p.name}" for p in writer.close()]
        # The human-judged evidence that rounds help: ratings of policy versions from arena battles.
        board = export_leaderboard(db, n_boot=500)
        (work / "leaderboard.json").write_text(json.dumps(board, indent=2), encoding="utf-8")
        card = render_card(
            spec=spec,
            fmt=fmt,
            stats=stats,
            splits=splits,
            files=files,
            policies=_policy_notes(db, stats),
            prompt_set_names=_prompt_set_names(db, spec),
            generated_at=datetime.now(UTC),
            leaderboard=board,
            pseudonym_key_id=key_id(pseudonym_key),
        )
        (work / "README.md").write_text(card, encoding="utf-8")
        result = ExportResult(dest, spec, stats, splits, ["README.md", "leaderboard.json", *files])
        result.pseudonym_key_id = key_id(pseudonym_key)
        if progress:
            progress(total, total, "packing" if spec.layout == "zip" else "finishing")
        _publish(work, dest, spec, overwrite)
        result.bytes = _size(dest)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stream_into(
    db: Session,
    spec: ExportSpec,
    fmt: Format,
    data_dir: Path,
    stats: ExportStats,
    total: int,
    pseudonym_key: str,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    page_size: int,
    excluded: set[int],
) -> dict[str, SplitWriter]:
    writers: dict[str, SplitWriter] = {}

    def on_task() -> None:
        stats.tasks_seen += 1
        if should_stop is not None and should_stop():
            raise ExportCancelled("export cancelled")
        if progress is not None:
            progress(
                stats.tasks_seen, total, f"{stats.total_rows} rows from {stats.tasks_seen}/{total} tasks"
            )

    try:
        for split, row, meta in iter_rows(
            db,
            spec,
            pseudonym_key=pseudonym_key,
            page_size=page_size,
            on_task=on_task,
            excluded_users=excluded,
        ):
            writer = writers.get(split)
            if writer is None:
                writer = writers[split] = SplitWriter(
                    data_dir, split, spec.file_format, fmt.schema, spec.rows_per_shard
                )
            writer.write(row)
            stats.add(split, meta)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    if not writers:
        # No rows: still a loadable dataset (an empty train split with the format's columns).
        writers[TRAIN] = SplitWriter(data_dir, TRAIN, spec.file_format, fmt.schema)
    return writers


def _publish(work: Path, dest: Path, spec: ExportSpec, overwrite: bool) -> None:
    if overwrite and dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    if spec.layout == "folder":
        work.rename(dest)
        return
    # Parquet is compressed already; JSONL shrinks a lot with deflate.
    compression = zipfile.ZIP_STORED if spec.file_format == "parquet" else zipfile.ZIP_DEFLATED
    partial = dest.parent / f".{dest.name}.zip-partial"
    try:
        with zipfile.ZipFile(partial, "w", compression=compression) as archive:
            for path in sorted(work.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(work).as_posix())
        partial.rename(dest)
    except BaseException:
        # A full disk or a cancelled worker: a half-written archive is of no use to anyone, and on
        # a full disk it holds the space the next attempt needs.
        partial.unlink(missing_ok=True)
        raise


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _policy_notes(db: Session, stats: ExportStats) -> list[PolicyNote]:
    versions = sorted(v for v in stats.rows_by_version if v is not None)
    if not versions:
        return []
    parent = Policy.__table__.alias("parent")
    rows = db.execute(
        select(Policy.version, Policy.kind, Policy.status, parent.c.version, Policy.created_at)
        .outerjoin(parent, parent.c.id == Policy.parent_id)
        .where(Policy.version.in_(versions))
        .order_by(Policy.version)
    )
    return [
        PolicyNote(v, kind, status, pv, as_utc(created) if created else None)
        for v, kind, status, pv, created in rows
    ]


def _prompt_set_names(db: Session, spec: ExportSpec) -> dict[int, str]:
    if not spec.prompt_set_ids:
        return {}
    return dict(
        db.execute(select(PromptSet.id, PromptSet.name).where(PromptSet.id.in_(spec.prompt_set_ids))).all()
    )
