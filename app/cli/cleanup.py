"""`prefloop cleanup`: delete what the retention settings say may go, or only list it with --dry-run."""

from __future__ import annotations

import click

from app.config import get_settings
from app.data.db import session_scope
from app.services.retention import apply_cleanup, free_bytes, plan_cleanup


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@click.command("cleanup")
@click.option(
    "--dry-run", is_flag=True, help="List what would be deleted and how many bytes; delete nothing."
)
def cleanup(dry_run: bool) -> None:
    """Delete old export archives, half-written archives, failed runs' checkpoints and old rejected
    candidate policies, as PREFLOOP_EXPORT_RETENTION_DAYS, PREFLOOP_PARTIAL_FILE_RETENTION_HOURS,
    PREFLOOP_FAILED_CHECKPOINT_RETENTION_HOURS and PREFLOOP_KEEP_REJECTED_CANDIDATES allow. Beat does
    the same every hour; the live and the previous policy are never deleted."""
    settings = get_settings()
    with session_scope() as db:
        plan = plan_cleanup(db, settings)
    for item in plan:
        click.echo(f"{human_bytes(item.size):>10}  {item.path}  ({item.reason})")
    total = human_bytes(sum(item.size for item in plan))
    free = human_bytes(free_bytes(settings.resolved_data_dir))
    if dry_run:
        click.echo(
            f"would delete {len(plan)} items, {total}; {free} free in {settings.resolved_data_dir} now"
        )
        return
    result = apply_cleanup(plan)
    click.echo(f"deleted {len(result.deleted)} items, {human_bytes(result.freed_bytes)} freed")
    if result.errors:
        raise click.ClickException(f"{len(result.errors)} could not be deleted: " + "; ".join(result.errors))
