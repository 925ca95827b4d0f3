"""The `prefloop` command: the click group, with each concern's subcommands registered from its own module.

Every subcommand explains itself with --help.
"""

from __future__ import annotations

import logging

import click

from app.broker import install_sender
from app.cli.cleanup import cleanup
from app.cli.database import init, migrate
from app.cli.demo_loop import demo_loop
from app.cli.export import export_command
from app.cli.rounds import round_group
from app.cli.serve import beat, serve, worker
from app.cli.users import users


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
    install_sender()  # commands that start rounds, refills or exports enqueue them by name


for command in (migrate, init, users, worker, beat, serve, export_command, round_group, demo_loop, cleanup):
    main.add_command(command)
