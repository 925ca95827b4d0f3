"""Running the loop's processes: `prefloop worker`, `beat`, and `serve`, which runs the web app with
its workers beside it (restarted when they die, see app.cli.supervisor) and stops them all cleanly on
Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

import click

from app.cli.display import redact
from app.cli.supervisor import Backoff, Supervisor, exit_once_on_sigterm
from app.config import default_secret_refusal, get_settings, is_loopback
from app.data.db import session_scope
from app.data.migrate import run_migrations
from app.services.demo import DEMO_USERS, active_demo_accounts, demo_accounts_refusal


def worker_command(queues: str, concurrency: int, beat: bool, loglevel: str = "INFO") -> list[str]:
    """The command line of a Celery worker on these queues (with the scheduler inside it if `beat`)."""
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


def embedded_worker_commands(loglevel: str = "WARNING") -> dict[str, list[str]]:
    """The embedded stack's workers: training and generation on `gpu`, one task at a time; exports
    and maintenance on `default` in a process of their own, with beat, so they never wait behind a
    round that holds the gpu worker for an hour."""
    return {
        "gpu worker": worker_command("gpu", 1, beat=False, loglevel=loglevel),
        "default worker": worker_command("default", 2, beat=True, loglevel=loglevel),
    }


@click.command()
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


@click.command()
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


@click.command()
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
    if settings.uses_default_secret and not is_loopback(host):
        raise click.ClickException(default_secret_refusal(host))
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.sqlalchemy_url)
    if settings.environment == "production":
        with session_scope() as db:
            demo_accounts = active_demo_accounts(db)
        if demo_accounts:
            raise click.ClickException(demo_accounts_refusal(demo_accounts))
    # A supervisor that gives up stops the web app as Ctrl-C would; `serve` then exits non-zero.
    supervisor = Supervisor(
        {} if no_worker else embedded_worker_commands(),
        Backoff.from_settings(settings),
        on_give_up=lambda _reason: os.kill(os.getpid(), signal.SIGTERM),
    )
    url = f"http://{host}:{port}"
    click.echo(f"prefloop is starting at {url}")
    click.echo(f"  database: {redact(settings.sqlalchemy_url)}")
    click.echo(f"  broker:   {redact(settings.celery_broker_url)}")
    if not no_worker:
        click.echo("  workers:  gpu (training, generation) and default (exports, maintenance, beat)")
    if settings.environment == "development":
        logins = ", ".join(f"{u} / {p}" for u, _role, p in DEMO_USERS)
        click.echo(f"  demo logins (after `prefloop init --demo`): {logins}")
    # Until uvicorn takes SIGTERM over, a stop request must unwind through the `finally` below like
    # Ctrl-C does; the default action would end `serve` at once and leave its workers running.
    signal.signal(signal.SIGTERM, exit_once_on_sigterm)
    with supervisor:
        try:
            if web_workers > 1:
                uvicorn.run(
                    "app.web.main:create_app",
                    factory=True,
                    host=host,
                    port=port,
                    workers=web_workers,
                    log_level="warning",
                )
            else:
                config = uvicorn.Config(
                    "app.web.main:create_app", factory=True, host=host, port=port, log_level="warning"
                )
                _QuietServer(config).run()
        finally:
            supervisor.stop()
            click.echo("prefloop stopped")
    if supervisor.gave_up:
        raise click.ClickException(supervisor.gave_up)


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
