"""`prefloop users`: create and deactivate users, issue API tokens, list who can log in."""

from __future__ import annotations

import click

from app.data.db import session_scope
from app.services.accounts import (
    MIN_PASSWORD_LENGTH,
    AccountError,
    create_api_token,
    create_user,
    deactivate_user,
    user_named,
    users_with_token_counts,
)


@click.group()
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
    if len(password) < MIN_PASSWORD_LENGTH:
        raise click.BadParameter(f"use at least {MIN_PASSWORD_LENGTH} characters", param_hint="--password")
    with session_scope() as db:
        try:
            create_user(db, username, role, password, email=email)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"created {role} {username}")


@users.command("deactivate")
@click.argument("username")
def users_deactivate(username: str) -> None:
    """Stop a user from logging in or using API tokens; their judgements stay in the database.

    Web processes notice within PREFLOOP_AUTH_CACHE_SECONDS.
    """
    with session_scope() as db:
        try:
            deactivate_user(db, username)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"deactivated {username}")


@users.command("token")
@click.argument("username")
@click.option("--name", default="cli", help="A label to recognise the token by.")
def users_token(username: str, name: str) -> None:
    """Issue an API bearer token for a user. It is printed once and stored only as a hash."""
    with session_scope() as db:
        user = user_named(db, username)
        if user is None:
            raise click.ClickException(f"no user {username!r}; create it with `prefloop users create`")
        token = create_api_token(db, user, name)
    click.echo(token)


@users.command("list")
def users_list() -> None:
    """List users with their role and API token count."""
    with session_scope() as db:
        rows = users_with_token_counts(db)
    click.echo(f"{'username':<24} {'role':<11} {'active':<7} tokens")
    for username, role, active, tokens in rows:
        click.echo(f"{username:<24} {role:<11} {'yes' if active else 'no':<7} {tokens}")
