"""`prefloop round …`: start, watch, cancel rounds and promote or roll back policies from the shell."""

from __future__ import annotations

import time

import click
from pydantic import ValidationError
from sqlalchemy import select
from tqdm import tqdm

from app.config import get_settings
from app.data.db import session_scope
from app.data.models import Policy, Round, Run
from app.services.cancellation import CancelRefused, cancel_round_on_request
from app.services.promotion import Promotion, promote, rollback
from app.services.registry import RegistryError
from app.services.round_spec import (
    SECTIONS,
    RoundSpec,
    describe_problems,
    setting_fields,
    spec_from_settings,
)
from app.services.rounds import RoundConflict, RoundError, start_round


def parse_overrides(algorithm: str, pairs: tuple[str, ...], auto_promote: bool = True) -> RoundSpec:
    """`--set policy.steps=4 --set reward.epochs=2` → the RoundSpec with those settings changed.

    A name the trainers do not have, or a value of the wrong type, is a usage error naming it.
    """
    settings: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name.partition(".")[0] not in SECTIONS or "." not in name:
            raise click.BadParameter(
                f"{pair!r}: write SECTION.NAME=VALUE with SECTION one of {', '.join(SECTIONS)}",
                param_hint="--set",
            )
        settings[name] = value
    try:
        return spec_from_settings(algorithm, settings, auto_promote=auto_promote)
    except ValidationError as exc:
        raise click.BadParameter(describe_problems(exc), param_hint="--set") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


@click.group("round")
def round_group() -> None:
    """Start and watch training rounds (reward model → PPO-max or DPO → evaluation → promote)."""


@round_group.command("start")
@click.option("--algorithm", type=click.Choice(["ppo", "dpo"]), default="ppo", show_default=True)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.NAME=VALUE",
    help="Change a trainer setting, e.g. --set policy.steps=20 --set reward.epochs=2 --set "
    "gate.min_win_rate=0.4 (`prefloop round settings` lists them).",
)
@click.option(
    "--no-auto-promote", is_flag=True, help="Wait for an admin to promote a candidate that passed the gate."
)
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Follow the round with a progress bar."
)
def round_start(algorithm: str, overrides: tuple[str, ...], no_auto_promote: bool, wait: bool) -> None:
    """Start a round on every comparison collected so far. A worker must be running (`prefloop serve`
    or `prefloop worker`); only one round runs at a time."""
    spec = parse_overrides(algorithm, overrides, auto_promote=not no_auto_promote)
    try:
        with session_scope() as db:
            round_id = start_round(db, spec).id
    except RoundConflict as exc:
        raise click.ClickException(f"{exc} (`prefloop round cancel {exc.round_id}`)") from None
    except RoundError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"round {round_id} queued ({algorithm})")
    if wait:
        status = follow_round(round_id)
        if status not in ("succeeded", "awaiting_approval", "awaiting_votes"):
            raise SystemExit(1)


def follow_round(round_id: int, poll_seconds: float = 1.0) -> str:
    """Show the round's stage and its current run's progress until it ends; returns the final status."""
    bar = tqdm(
        total=100,
        desc=f"round {round_id}",
        unit="%",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
    )
    try:
        while True:
            with session_scope() as db:
                round_ = db.get(Round, round_id)
                run = db.query(Run).filter(Run.round_id == round_id).order_by(Run.id.desc()).first()
                bar.set_description(f"round {round_id} · {round_.stage}")
                if run is not None:
                    bar.n = int(run.progress * 100)
                    bar.set_postfix_str((run.progress_message or "")[:60])
                bar.refresh()
                if round_.status not in ("queued", "running"):
                    status, error = round_.status, round_.error
                    live = (
                        db.query(Policy)
                        .join(Round, Round.id == Policy.round_id)
                        .filter(Round.id == round_id)
                        .first()
                    )
                    version = live.version if live else None
                    break
            time.sleep(poll_seconds)
    finally:
        bar.close()
    if status == "succeeded":
        click.echo(f"round {round_id} succeeded: policy v{version} is live")
    elif status == "awaiting_votes":
        click.echo(
            f"round {round_id}: candidate v{version} passed the judge's checks and waits for arena votes; "
            f"the admin console's round page shows them coming in"
        )
    elif status == "awaiting_approval":
        click.echo(
            f"round {round_id}: candidate v{version} passed the gate; promote it with `prefloop round promote {version}`"
        )
    else:
        click.echo(f"round {round_id} {status}: {error}", err=True)
    return status


@round_group.command("status")
@click.argument("round_id", type=int, required=False)
def round_status(round_id: int | None) -> None:
    """Show the latest rounds, or one round with its runs."""
    with session_scope() as db:
        if round_id is None:
            rounds = db.scalars(select(Round).order_by(Round.id.desc()).limit(10)).all()
            if not rounds:
                click.echo("no rounds yet: `prefloop round start`")
            for r in rounds:
                click.echo(
                    f"{r.id:>4}  {r.algorithm:<4} {r.status:<18} stage={r.stage:<12} {r.created_at:%Y-%m-%d %H:%M}  {r.error[:80]}"
                )
            return
        r = db.get(Round, round_id)
        if r is None:
            raise click.ClickException(f"no round {round_id}")
        click.echo(
            f"round {r.id}: {r.algorithm} {r.status} (stage {r.stage}); comparisons up to #{r.comparison_snapshot}"
        )
        for run in db.scalars(select(Run).where(Run.round_id == r.id).order_by(Run.id)):
            click.echo(
                f"  run {run.id:>4} {run.kind:<9} {run.status:<10} {run.progress:>5.0%}  {run.progress_message[:60]}"
            )
            if run.error:
                click.echo("    " + run.error.splitlines()[0])


@round_group.command("cancel")
@click.argument("round_id", type=int)
def round_cancel(round_id: int) -> None:
    """Cancel a running round; its current run stops at the next step."""
    with session_scope() as db:
        try:
            cancel_round_on_request(db, round_id)
        except CancelRefused as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"round {round_id} cancelled")


@round_group.command("settings")
@click.option("--algorithm", type=click.Choice(["ppo", "dpo"]), default="ppo", show_default=True)
def round_settings(algorithm: str) -> None:
    """List every setting `round start --set` takes, with its type and default."""
    for field in setting_fields(algorithm):
        note = " (off unless set)" if field.group_off_by_default else ""
        click.echo(f"{field.name:<40} {field.kind:<18} {field.default}{note}")


@round_group.command("promote")
@click.argument("version", type=int)
def round_promote(version: int) -> None:
    """Make a registered policy version live (every server swaps to it) and refill tasks with it."""
    with session_scope() as db:
        try:
            promotion = promote(db, version, get_settings())
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        _say_what_changed(promotion, f"policy v{version} is live")


@round_group.command("rollback")
def round_rollback() -> None:
    """Put the previously live policy version back and refill tasks with it."""
    with session_scope() as db:
        try:
            promotion = rollback(db, get_settings())
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        _say_what_changed(promotion, f"policy v{promotion.policy.version} is live again")


def _say_what_changed(promotion: Promotion, done: str) -> None:
    if not promotion.changed:
        click.echo(f"{done} already; nothing to refill")
        return
    click.echo(done)
    if promotion.refill_error:
        click.echo(f"the task pool was not refilled: {promotion.refill_error}", err=True)
