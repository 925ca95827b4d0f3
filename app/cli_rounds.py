"""`prefloop round …`: start, watch, cancel rounds and promote or roll back policies from the shell."""

from __future__ import annotations

import json
import time

import click

from app.config import get_settings


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, dict]:
    """`--set policy.steps=4 --set reward.epochs=2` → {"policy": {"steps": 4}, "reward": {"epochs": 2}}."""
    sections: dict[str, dict] = {"reward": {}, "policy": {}, "gate": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in sections or not name:
            raise click.BadParameter(
                f"{pair!r}: write SECTION.NAME=VALUE with SECTION one of reward, policy, gate"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # plain strings need no quotes
        sections[section][name] = value
    return sections


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
    help="Override a trainer setting, e.g. --set policy.steps=20 --set reward.epochs=2 --set gate.min_win_rate=0.4.",
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
    from app.db import session_scope
    from app.rounds import RoundConflict, RoundError, start_round

    knobs = {**parse_overrides(overrides), "auto_promote": not no_auto_promote}
    try:
        with session_scope() as db:
            round_id = start_round(db, algorithm=algorithm, knobs=knobs).id
    except RoundConflict as exc:
        raise click.ClickException(f"{exc} (`prefloop round cancel {exc.round_id}`)") from None
    except RoundError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"round {round_id} queued ({algorithm})")
    if wait:
        status = follow_round(round_id)
        if status not in ("succeeded", "awaiting_approval"):
            raise SystemExit(1)


def follow_round(round_id: int, poll_seconds: float = 1.0) -> str:
    """Show the round's stage and its current run's progress until it ends; returns the final status."""
    from tqdm import tqdm

    from app.db import session_scope
    from app.models import Policy, Round, Run

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
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Round, Run

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
    from app.db import session_scope
    from app.rounds import cancel_round

    with session_scope() as db:
        if not cancel_round(db, round_id):
            raise click.ClickException(f"round {round_id} is not running")
    click.echo(f"round {round_id} cancelled")


@round_group.command("promote")
@click.argument("version", type=int)
def round_promote(version: int) -> None:
    """Make a registered policy version live (every server swaps to it) and refill tasks with it."""
    from app.db import session_scope
    from app.registry import RegistryError, live_policy, promote
    from app.rounds import after_promote

    with session_scope() as db:
        previous = live_policy(db)
        try:
            policy = promote(db, version, get_settings())
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        after_promote(db, policy, previous)
    click.echo(f"policy v{version} is live")


@round_group.command("rollback")
def round_rollback() -> None:
    """Put the previously live policy version back and refill tasks with it."""
    from app.db import session_scope
    from app.registry import RegistryError, rollback
    from app.rounds import after_rollback

    with session_scope() as db:
        try:
            policy = rollback(db, get_settings())
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        after_rollback(db, policy)
    click.echo(f"policy v{policy.version} is live again")
