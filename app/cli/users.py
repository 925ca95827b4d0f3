"""`prefloop users`: create, deactivate, reactivate, change roles, reset passwords, issue, list and
revoke API tokens, read the audit log. Every change is recorded in the audit log as `cli:<os user>`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import click
from sqlalchemy.orm import Session

from app.data.db import session_scope
from app.data.models import ROLES
from app.services import user_admin
from app.services.accounts import AccountError
from app.services.audit import Actor, recent_entries

CACHE_NOTE = "Web processes notice within PREFLOOP_AUTH_CACHE_SECONDS (default 10)."


@contextmanager
def _changing() -> Iterator[tuple[Session, Actor]]:
    """A committed session and the CLI as the actor; an account error becomes a clear CLI error."""
    try:
        with session_scope() as db:
            yield db, Actor.command_line()
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None


def _when(moment: datetime | None, never: str = "—") -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else never


@click.group()
def users() -> None:
    """Manage users (annotator, admin, researcher), their API tokens, and read the audit log.

    Changes take effect in running web processes within PREFLOOP_AUTH_CACHE_SECONDS (default 10 s),
    and each is recorded in the audit log (`prefloop users audit`, or /admin/audit).
    """


@users.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option(
    "--password", prompt=True, hide_input=True, confirmation_prompt=True, help="Prompted when omitted."
)
@click.option("--email", default=None)
def users_create(username: str, role: str, password: str, email: str | None) -> None:
    """Create a user with a password (hashed with argon2)."""
    if len(password) < user_admin.MIN_PASSWORD_LENGTH:
        raise click.BadParameter(
            f"use at least {user_admin.MIN_PASSWORD_LENGTH} characters", param_hint="--password"
        )
    with _changing() as (db, actor):
        user_admin.create(db, actor, username, role, password, email=email)
    click.echo(f"created {role} {username}")


def _simple_change(name: str, doc: str, change: Callable[..., object], done: str) -> None:
    @users.command(name, help=f"{doc}\n\n{CACHE_NOTE}")
    @click.argument("username")
    def command(username: str) -> None:
        with _changing() as (db, actor):
            change(db, actor, username)
        click.echo(f"{done} {username}")


_simple_change(
    "deactivate",
    "Stop a user from logging in or using API tokens and end their sessions; their judgements stay "
    "in the database. The last active admin cannot be deactivated.",
    user_admin.deactivate,
    "deactivated",
)
_simple_change(
    "reactivate",
    "Let a deactivated user log in again; their unexpired, unrevoked API tokens work again.",
    user_admin.reactivate,
    "reactivated",
)


@users.command("role")
@click.argument("username")
@click.argument("role", type=click.Choice(ROLES))
def users_role(username: str, role: str) -> None:
    """Change a user's role. The last active admin cannot be demoted.

    Web processes notice within PREFLOOP_AUTH_CACHE_SECONDS (default 10).
    """
    with _changing() as (db, actor):
        previous = user_admin.user_or_error(db, username).role
        user_admin.change_role(db, actor, username, role)
    click.echo(f"{username}: {previous} -> {role}")


@users.command("reset-password")
@click.argument("username")
@click.option(
    "--generate",
    is_flag=True,
    help="Generate a random password and print it once, instead of prompting for one.",
)
def users_reset_password(username: str, generate: bool) -> None:
    """Set a new password for a user and end all their sessions (API tokens are kept; revoke them
    with `revoke-token`).

    Web processes notice within PREFLOOP_AUTH_CACHE_SECONDS (default 10).
    """
    password = None
    if not generate:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    with _changing() as (db, actor):
        _user, password = user_admin.reset_password(db, actor, username, password)
    if generate:
        click.echo(password)
    click.echo(f"reset the password of {username}; their sessions have ended", err=generate)


@users.command("token")
@click.argument("username")
@click.option("--name", default="cli", help="A label to recognise the token by.")
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=None,
    help="Lifetime in days (default PREFLOOP_API_TOKEN_DAYS, 90). After it, calls get 401.",
)
def users_token(username: str, name: str, days: int | None) -> None:
    """Issue an API bearer token for a user. It is printed once (alone on stdout) and stored only as a
    hash; its id and expiry go to stderr."""
    with _changing() as (db, actor):
        token, row = user_admin.issue_token(db, actor, username, name, days)
        token_id, expires = row.id, row.expires_at
    click.echo(token)
    click.echo(f"token {token_id} for {username}, expires {_when(expires)} UTC", err=True)


@users.command("tokens")
@click.argument("username", required=False)
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
def users_tokens(username: str | None, include_revoked: bool) -> None:
    """List API tokens (id, owner, label, prefix, last use, expiry, state), of one user or of all;
    never their values."""
    with _changing() as (db, _actor):
        tokens = user_admin.list_tokens(db, username, include_revoked=include_revoked)
    click.echo(f"{'id':>5} {'user':<24} {'name':<16} {'prefix':<13} {'last used':<16} {'expires':<16} state")
    for t in tokens:
        click.echo(
            f"{t.id:>5} {t.username:<24} {t.name[:16]:<16} {t.prefix:<13} {_when(t.last_used_at):<16} "
            f"{_when(t.expires_at, 'never'):<16} {t.state}"
        )


@users.command("revoke-token")
@click.argument("token_id", type=int)
def users_revoke_token(token_id: int) -> None:
    """Revoke an API token by its id (`prefloop users tokens` lists them).

    Web processes notice within PREFLOOP_AUTH_CACHE_SECONDS (default 10).
    """
    with _changing() as (db, actor):
        token = user_admin.revoke_token(db, actor, token_id)
        owner = token.user.username
    click.echo(f"revoked token {token_id} of {owner}")


@users.command("list")
def users_list() -> None:
    """List users with their role, whether they are active, and how many API tokens still work."""
    with _changing() as (db, _actor):
        rows = user_admin.list_users(db)
    click.echo(f"{'username':<24} {'role':<11} {'active':<7} tokens")
    for row in rows:
        click.echo(f"{row.username:<24} {row.role:<11} {'yes' if row.active else 'no':<7} {row.live_tokens}")


@users.command("audit")
@click.option("--user", "username", default=None, help="Only entries about this user.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def users_audit(username: str | None, limit: int) -> None:
    """Show the audit log of account changes, newest first: when, who, what, to whom."""
    with _changing() as (db, _actor):
        target = user_admin.user_or_error(db, username).id if username else None
        entries = recent_entries(db, limit=limit, target_user_id=target)
        lines = [
            f"{_when(e.created_at):<16} {e.actor:<24} {e.action:<15} {e.target:<24} "
            + ", ".join(f"{k}={v}" for k, v in (e.detail or {}).items())
            for e in entries
        ]
    click.echo(f"{'when (UTC)':<16} {'who':<24} {'action':<15} {'user':<24} detail")
    for line in lines:
        click.echo(line.rstrip())
